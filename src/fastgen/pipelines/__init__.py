"""Generation and scoring pipelines on engines."""
