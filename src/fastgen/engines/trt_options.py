"""TensorRT builder settings (``BuildConfig.tensorrt``) and the optimization profiles they ask for."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from fastgen.core.config import ConfigMixin
from fastgen.errors import InvalidArgumentError
from fastgen.models.spec import DimRange, ExportSpec, ShapeProfile


@dataclass(frozen=True)
class TensorRTOptions(ConfigMixin):
    """How a TensorRT engine is built (everything but ``timing_cache`` enters the cache key)."""

    optimization_level: int = 3
    """Builder optimisation level, 0 (fastest build) to 5 (most tactics tried); TensorRT's default is 3."""
    workspace_gib: float = 0.0
    """Scratch memory a layer's tactics may use, in GiB (0: TensorRT's default, the GPU's memory)."""
    refittable: bool = False
    """Build the engine refittable: new weights for the same graph (a fine-tuned checkpoint, fused
    LoRA weights) are then applied with TensorRT's refitter instead of a rebuild."""
    timing_cache: bool = True
    """Keep TensorRT's timing cache between builds (one per GPU and TensorRT version): rebuilds are fast."""
    extra_profiles: tuple[str, ...] = ()
    """Extra optimization profiles, each a profile override like --profile (``height=512,width=512``):
    a shape bucket the runtime serves gets its own optimum."""
    seq_buckets: tuple[int, ...] = ()
    """Sequence-length buckets (the runtime's text buckets): one extra profile per bucket for components
    with a ``seq`` dim, min just above the bucket below, opt = max = the bucket's edge."""

    def __post_init__(self) -> None:
        level = self.optimization_level
        if isinstance(level, bool) or not isinstance(level, int) or not 0 <= level <= 5:
            raise InvalidArgumentError("trt-optimization-level", level, "integers 0 to 5")
        if isinstance(self.workspace_gib, bool) or not isinstance(self.workspace_gib, (int, float)) \
                or not math.isfinite(self.workspace_gib) or self.workspace_gib < 0:
            raise InvalidArgumentError("trt-workspace-gib", self.workspace_gib, "a number of GiB >= 0 (0: default)")
        if isinstance(self.extra_profiles, str):
            object.__setattr__(self, "extra_profiles", (self.extra_profiles,))
        profiles = tuple(str(p) for p in self.extra_profiles)
        for text in profiles:
            ShapeProfile.parse(text)  # raises naming the bad entry
        object.__setattr__(self, "extra_profiles", profiles)
        buckets = tuple(self.seq_buckets)
        if any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in buckets) \
                or list(buckets) != sorted(set(buckets)):
            raise InvalidArgumentError("trt-seq-buckets", list(buckets), "increasing integers >= 1 (token lengths)")
        object.__setattr__(self, "seq_buckets", buckets)

    def artifact_dict(self) -> dict[str, Any]:
        """The settings that change the plan (the timing cache only changes how fast it is built)."""
        return {k: v for k, v in self.to_dict().items() if k != "timing_cache"}


def profiles_for(spec: ExportSpec, options: TensorRTOptions) -> list[ShapeProfile]:
    """The optimization profiles of an engine: the spec's own, then ``extra_profiles``, then one per
    sequence bucket inside the spec's ``seq`` range. Duplicates are dropped; every profile holds the
    spec's dims and each range lies inside the spec's (a bucket outside the engine's range is an error)."""
    base = spec.profile
    out = [base]
    for text in options.extra_profiles:
        extra = base.merged(ShapeProfile.parse(text))
        for name, rng in ShapeProfile.parse(text).dims.items():
            if name not in base.dims:
                raise InvalidArgumentError("trt-extra-profiles", text, sorted(base.dims),
                                           reason=f"{name!r} is not a dim of this {spec.component}")
            outer = base.dims[name]
            if rng.min < outer.min or rng.max > outer.max:
                raise InvalidArgumentError("trt-extra-profiles", text,
                                           f"{name} within {outer.min}:{outer.opt}:{outer.max} (the engine's range)")
        spec.check_dims(extra.shape("min"), argument="trt-extra-profiles")
        spec.check_dims(extra.shape("max"), argument="trt-extra-profiles")
        out.append(extra)
    seq = base.dims.get("seq")
    if seq is not None and options.seq_buckets:
        low = seq.min
        for edge in options.seq_buckets:
            if edge < seq.min:
                continue
            edge = min(edge, seq.max)
            out.append(base.merged({"seq": DimRange(low, edge, edge)}))
            low = edge + 1
            if edge >= seq.max:
                break
    unique: list[ShapeProfile] = []
    for profile in out:
        if profile not in unique:
            unique.append(profile)
    return unique


def choose_profile(profiles: list[ShapeProfile], sizes: dict[str, int]) -> int | None:
    """Index of the profile to run root ``sizes`` with: among those that hold every size, the one whose
    opt point is nearest (relative distance, so a seq of 40 runs the 48 bucket, not the 512 one), and
    among equally near ones the narrowest (a bucket's own profile is tuned for fewer shapes); None when
    no profile holds them."""
    best, best_cost = None, (math.inf, math.inf)
    for index, profile in enumerate(profiles):
        dims = {k: v for k, v in sizes.items() if k in profile.dims}
        if not all(profile.dims[k].min <= v <= profile.dims[k].max for k, v in dims.items()):
            continue
        cost = (round(sum(abs(math.log(profile.dims[k].opt / v)) for k, v in dims.items() if v > 0), 9),
                sum(math.log(r.max / r.min) for r in profile.dims.values()))
        if cost < best_cost:
            best, best_cost = index, cost
    return best


__all__ = ["TensorRTOptions", "choose_profile", "profiles_for"]
