"""Object detection (YOLO-style outputs, non-maximum suppression): ``Scorer.detect``.

A mixin of :class:`fastgen.pipelines.scorer.Scorer`: methods over the scorer's engine(s) and preprocessors."""

from __future__ import annotations

from typing import Any


class DetectionMethods:
    """Mixed into :class:`~fastgen.pipelines.scorer.Scorer`."""

    engine: Any

    def _is_detector(self, spec: Any) -> bool:
        """Whether an engine with this spec is a detector (its task, when none is given, is ``detect``)."""
        return False
