"""Host-side tensor ops with a PyTorch reference path and an optional C++ fast path (``fastgen._C``).

``available()`` says whether the extension will be used; ``FASTGEN_DISABLE_EXT=1`` turns it off.
"""

from __future__ import annotations

from fastgen.ops._ext import available
from fastgen.ops.image import normalize_nchw, to_uint8_nhwc

__all__ = ["available", "normalize_nchw", "to_uint8_nhwc"]
