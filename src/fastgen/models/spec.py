"""Export specs: what goes in and out of one exported component, and which dims may vary.

A shape entry is an ``int`` (static) or a symbol: ``"batch"``, or a derived symbol such as
``"height/8"`` (the latent height of an image of ``height`` pixels). Profiles are always given on
the root symbols (``height=256:512:1024`` in pixels), so one profile serves the UNet, the VAE and
the pipeline alike; derived dims must divide exactly.

Sizes are also bounded by memory (:func:`memory_limit_bytes`), before anything is allocated: a
profile whose max would make the inputs and outputs of one call take more than 1/8 of this machine's
memory (the activations need the rest, many times over), or call sizes that would make one tensor
larger than all of it, are refused in one line naming the dim. Such an engine could never be
verified, benchmarked or called at those sizes, and trying turns a typo (``batch=1:1:100000000``)
into a 400 TB allocation.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from fastgen.core.config import ConfigMixin
from fastgen.errors import InvalidArgumentError

DType = Literal["float32", "float16", "bfloat16", "int64", "int32", "uint8", "bool"]
ShapeEntry = int | str
Which = Literal["min", "opt", "max"]

_SYMBOL = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)(?:/(\d+))?$")
# ASCII digits only: str.isdigit() also accepts superscripts ("\u00b2"), which int() then rejects.
_NUMBER = re.compile(r"^[0-9]+$")
#: A profile's max must leave memory for the network's activations: its inputs and outputs together may
#: take at most 1/PROFILE_MEMORY_SHARE of it (every preset's profile takes under 120 MB).
PROFILE_MEMORY_SHARE = 8
_ITEM_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "uint8": 1, "bool": 1}


@functools.lru_cache(maxsize=1)
def memory_limit_bytes() -> int:
    """The memory sizes are checked against: this machine's physical memory, or its cgroup's memory
    limit when that is lower (a container); 1 TiB where neither can be read. Cached: it is asked on
    every engine call."""
    limit = 1 << 40
    try:
        limit = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        pass
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path, encoding="ascii") as f:
                text = f.read().strip()
        except OSError:
            continue
        if text.isdigit() and 0 < int(text) < limit:
            limit = int(text)
    return max(limit, 1 << 26)


def human_bytes(num: float) -> str:
    """``123456789`` -> ``123.5 MB`` (powers of 1000, as disks and ``free -h --si`` count)."""
    for unit in ("bytes", "kB", "MB", "GB", "TB", "PB"):
        if num < 1000 or unit == "PB":
            return f"{num:.0f} {unit}" if unit == "bytes" else f"{num:.3g} {unit}" if num >= 1e4 else f"{num:.1f} {unit}"
        num /= 1000
    return str(num)  # pragma: no cover


def parse_dim(entry: ShapeEntry) -> tuple[str, int] | None:
    """``"height/8"`` -> ``("height", 8)``, ``"batch"`` -> ``("batch", 1)``, an int -> None."""
    if isinstance(entry, int):
        return None
    m = _SYMBOL.match(entry)
    if not m:
        raise InvalidArgumentError("shape entry", entry, "an int, 'name' or 'name/N'")
    return m.group(1), int(m.group(2) or 1)


def onnx_dim_name(entry: str) -> str:
    """The ``dim_param`` written into ONNX for a symbolic entry (``height/8`` -> ``height_div8``)."""
    symbol, div = parse_dim(entry)  # type: ignore[misc]
    return symbol if div == 1 else f"{symbol}_div{div}"


@dataclass(frozen=True)
class DimRange(ConfigMixin):
    """The range one symbolic dimension may take in an engine."""

    min: int
    """Smallest size the engine must accept."""
    opt: int
    """Size the engine is tuned for (TensorRT's opt shape; also the default benchmark shape)."""
    max: int
    """Largest size the engine must accept."""

    def __post_init__(self) -> None:
        if not (1 <= self.min <= self.opt <= self.max):
            raise InvalidArgumentError("profile", f"{self.min}:{self.opt}:{self.max}",
                                       "integers with 1 <= min <= opt <= max")

    def at(self, which: Which) -> int:
        return getattr(self, which)

    def to_dict(self) -> dict[str, Any]:
        return {"min": self.min, "opt": self.opt, "max": self.max}


@dataclass(frozen=True)
class ShapeProfile(ConfigMixin):
    """min/opt/max for every symbolic dimension of a component, keyed by root symbol."""

    dims: Mapping[str, DimRange] = field(default_factory=dict)
    """Root symbol (``batch``, ``height``, ``seq``...) to its range."""

    def __post_init__(self) -> None:
        # Freeze into a sorted plain dict so equal profiles compare and hash equal.
        object.__setattr__(self, "dims", {k: self.dims[k] for k in sorted(self.dims)})

    def __hash__(self) -> int:
        return hash(tuple((k, v.min, v.opt, v.max) for k, v in self.dims.items()))

    @classmethod
    def of(cls, **dims: tuple[int, int, int] | int) -> ShapeProfile:
        """``ShapeProfile.of(batch=(1, 2, 4), seq=77)``; an int means min = opt = max."""
        return cls({k: DimRange(*((v,) * 3 if isinstance(v, int) else v)) for k, v in dims.items()})

    @classmethod
    def parse(cls, text: str) -> ShapeProfile:
        """Parse ``batch=1:4:8,height=512`` (an entry may give one value, or min:opt:max).

        The empty string is the empty profile; text with no entry (``,,,``) or a dim given twice is refused.
        """
        allowed = "NAME=N or NAME=MIN:OPT:MAX, comma-separated"
        dims: dict[str, DimRange] = {}
        parts = [p.strip() for p in text.split(",")]
        if text.strip() and not any(parts):
            raise InvalidArgumentError("profile", text, allowed)
        for part in filter(None, parts):
            name, sep, value = part.partition("=")
            name = name.strip()
            nums = [n.strip() for n in value.split(":")]
            if (not sep or not _SYMBOL.match(name) or "/" in name or len(nums) not in (1, 3)
                    or not all(_NUMBER.match(n) for n in nums)):
                raise InvalidArgumentError("profile", part, allowed)
            if name in dims:
                raise InvalidArgumentError("profile", part, reason=f"{name} is given twice")
            vals = [int(n) for n in nums]
            dims[name] = DimRange(*(vals * 3 if len(vals) == 1 else vals))
        return cls(dims)

    def merged(self, overrides: ShapeProfile | Mapping[str, DimRange] | None) -> ShapeProfile:
        if overrides is None:
            return self
        new = overrides.dims if isinstance(overrides, ShapeProfile) else overrides
        return ShapeProfile({**self.dims, **new})

    def shape(self, which: Which = "opt") -> dict[str, int]:
        return {k: v.at(which) for k, v in self.dims.items()}

    def to_dict(self) -> dict[str, Any]:
        return {k: v.to_dict() for k, v in self.dims.items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ShapeProfile:
        if "dims" in data and isinstance(data["dims"], Mapping):
            data = data["dims"]
        return cls({k: DimRange(**v) for k, v in data.items()})

    def __str__(self) -> str:
        return ",".join(f"{k}={v.min}:{v.opt}:{v.max}" for k, v in self.dims.items())


@dataclass(frozen=True)
class TensorSpec(ConfigMixin):
    """One named input or output of a component."""

    name: str
    """Tensor name in the exported graph and in ``Engine.run`` dicts."""
    dtype: DType
    """Element type at fp32 precision (a fp16 build changes float tensors to float16)."""
    shape: tuple[ShapeEntry, ...]
    """Static ints and symbols (``batch``, ``height/8``)."""
    low: float | None = None
    """Lower bound for random sample inputs (ints: inclusive); None means standard normal."""
    high: float | None = None
    """Upper bound for random sample inputs (ints: exclusive)."""
    kind: Literal["data", "mask"] = "data"
    """``mask``: a right-padded 0/1 attention mask with at least one valid position per row."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(self.shape))
        self.validate_literals()
        for entry in self.shape:
            parse_dim(entry)
        if self.dtype.startswith("int") and (self.low is None or self.high is None) and self.kind != "mask":
            raise InvalidArgumentError("low/high", (self.low, self.high), reason=f"integer input {self.name!r} needs bounds")

    @property
    def symbols(self) -> set[str]:
        return {parse_dim(e)[0] for e in self.shape if not isinstance(e, int)}  # type: ignore[index]

    def resolve(self, dims: Mapping[str, int]) -> tuple[int, ...]:
        out = []
        for entry in self.shape:
            parsed = parse_dim(entry)
            if parsed is None:
                out.append(int(entry))
                continue
            symbol, div = parsed
            if symbol not in dims:
                raise InvalidArgumentError("shape", symbol, sorted(dims), reason=f"no size given for {self.name!r}")
            if dims[symbol] % div:
                raise InvalidArgumentError(symbol, dims[symbol], f"multiples of {div}")
            out.append(dims[symbol] // div)
        return tuple(out)


@dataclass(frozen=True)
class ExportSpec(ConfigMixin):
    """Inputs, outputs and shape profile of one exported component."""

    component: str
    """Component kind: ``unet``, ``vae-decoder``, ``vae-encoder``, ``text-encoder``, ``classifier``..."""
    inputs: tuple[TensorSpec, ...]
    """Graph inputs, in the order the wrapped module's ``forward`` takes them."""
    outputs: tuple[TensorSpec, ...]
    """Graph outputs, in the order the wrapped module returns them."""
    profile: ShapeProfile = field(default_factory=ShapeProfile)
    """min/opt/max of every root symbol used by the inputs."""
    model_type: str = ""
    """Class name of the source model (``UNet2DConditionModel``...), for inspection only."""
    multiples: Mapping[str, int] = field(default_factory=dict)
    """Root symbol to the number every size of it must be a multiple of (a UNet's height must be a
    multiple of its total down-sampling factor: the exported graph is only right for those sizes)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "multiples", {k: int(v) for k, v in sorted(self.multiples.items())})
        object.__setattr__(self, "inputs", tuple(self.inputs))
        object.__setattr__(self, "outputs", tuple(self.outputs))
        names = [t.name for t in self.inputs + self.outputs]
        if len(set(names)) != len(names):
            raise InvalidArgumentError("tensor names", names, reason="must be unique")
        symbols = self.symbols
        missing = symbols - set(self.profile.dims)
        if missing:
            raise InvalidArgumentError("profile", sorted(missing)[0], sorted(symbols),
                                       reason="no range given for a dynamic dim")
        extra = set(self.profile.dims) - symbols
        if extra:
            raise InvalidArgumentError("profile", sorted(extra)[0], sorted(symbols))
        unknown = set(self.multiples) - symbols
        if unknown:
            raise InvalidArgumentError("multiples", sorted(unknown)[0], sorted(symbols))
        # Multiples only: a spec read back from an engine built on a bigger machine must still load
        # (it runs at smaller sizes); profiles are bounded by memory where they are chosen (with_profile).
        for which in ("min", "opt", "max"):
            self._check_multiples(self.profile.shape(which), argument="profile")

    def check_dims(self, dims: Mapping[str, int], argument: str | None = None) -> None:
        """Raise unless every root size is a multiple of what the component needs, and no input or output
        tensor at these sizes (roots not given: the profile's opt) would exceed :func:`memory_limit_bytes`."""
        self._check_multiples(dims, argument)
        self.check_memory(dims, argument)

    def _check_multiples(self, dims: Mapping[str, int], argument: str | None = None) -> None:
        for symbol, size in dims.items():
            multiple = self.multiples.get(symbol, 1)
            for t in self.inputs:  # derived dims (height/8) must divide exactly too
                for entry in t.shape:
                    parsed = parse_dim(entry)
                    if parsed is not None and parsed[0] == symbol:
                        multiple = math.lcm(multiple, parsed[1])
            if size % multiple:
                raise InvalidArgumentError(argument or symbol, size if argument is None else f"{symbol}={size}",
                                           f"multiples of {multiple} for this {self.component}")

    def tensor_bytes(self, dims: Mapping[str, int]) -> list[tuple[TensorSpec, int]]:
        """Each input and output with its bytes at these root sizes (roots not given: the profile's opt);
        outputs with a dim no input determines are left out."""
        full = {**self.profile.shape("opt"), **dims}
        out = []
        for t in self.inputs + self.outputs:
            if not t.symbols <= set(full):
                continue
            count = 1
            for entry in t.shape:
                parsed = parse_dim(entry)
                count *= int(entry) if parsed is None else full[parsed[0]] // parsed[1]
            out.append((t, count * _ITEM_BYTES.get(t.dtype, 8)))
        return out

    def check_memory(self, dims: Mapping[str, int], argument: str | None = None, *,
                     suspects: set[str] | None = None) -> None:
        """Raise, naming the dim, if these root sizes could not be allocated here.

        Sizes of a call (``argument`` None or a name): no input or output may exceed
        :func:`memory_limit_bytes`. A profile's max (``argument`` "profile"): the inputs and outputs of
        one call together must fit in 1/:data:`PROFILE_MEMORY_SHARE` of it, since the network's
        activations at those sizes take many times more (an SD UNet's first conv output is 80x its input),
        and an engine is verified and benchmarked at its max. The dim named is, of the largest tensor's
        dims (of ``suspects``, the dims the caller set, when it has any), the furthest above its opt.
        """
        sizes = self.tensor_bytes(dims)
        if not sizes:
            return
        tensor, biggest = max(sizes, key=lambda item: item[1])
        limit = memory_limit_bytes()
        profile = argument == "profile"
        total = sum(size for _, size in sizes) if profile else biggest
        budget = limit // PROFILE_MEMORY_SHARE if profile else limit
        if total <= budget:
            return
        full = {**self.profile.shape("opt"), **dims}
        opt = self.profile.shape("opt")
        shape = "x".join(str(full[p[0]] // p[1]) if (p := parse_dim(e)) else str(e) for e in tensor.shape)
        what = (f"the {self.component} {'input' if tensor in self.inputs else 'output'} {tensor.name!r} would be "
                f"{shape} {tensor.dtype}, {human_bytes(biggest)}")
        candidates = sorted(tensor.symbols, key=lambda s: (-full[s] / max(opt.get(s, 1), 1), s))
        culprits = [s for s in candidates if s in (suspects or ())] or candidates
        if profile:
            reason = (f"at max, {what} ({human_bytes(total)} with the other inputs and outputs), more than 1/"
                      f"{PROFILE_MEMORY_SHARE} of this machine's memory ({human_bytes(limit)}), which the network's "
                      "activations need many times over; lower the max")
            rng = self.profile.dims[culprits[0]]
            raise InvalidArgumentError("profile", f"{culprits[0]}={rng.min}:{rng.opt}:{rng.max}", reason=reason)
        symbol = culprits[0]
        reason = f"{what}, more than this machine's memory ({human_bytes(limit)}); lower {symbol}"
        raise InvalidArgumentError(argument or symbol, full[symbol] if argument is None else f"{symbol}={full[symbol]}",
                                   reason=reason)

    @property
    def symbols(self) -> set[str]:
        out: set[str] = set()
        for t in self.inputs:
            out |= t.symbols
        return out

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def with_profile(self, overrides: ShapeProfile | str | None) -> ExportSpec:
        """This spec with some dims' ranges replaced; unknown dim names raise."""
        if overrides is None:
            return self
        if isinstance(overrides, str):
            overrides = ShapeProfile.parse(overrides)
        for name in overrides.dims:
            if name not in self.symbols:
                raise InvalidArgumentError("profile", name, sorted(self.symbols) or "none: all dims are static")
        spec = dataclasses.replace(self, profile=self.profile.merged(overrides))
        spec.check_memory(spec.profile.shape("max"), argument="profile", suspects=set(overrides.dims))
        return spec

    def shape_at(self, shape: Which | Mapping[str, int] = "opt") -> dict[str, int]:
        dims = self.profile.shape(shape) if isinstance(shape, str) else {**self.profile.shape("opt"), **shape}
        return dims

    def resolve(self, dims: Mapping[str, int]) -> dict[str, tuple[int, ...] | None]:
        """Concrete shape of every input and output for the given root sizes.

        An output whose dims are not all determined by the inputs (a third-party graph with a
        data-dependent dim) maps to None.
        """
        out: dict[str, tuple[int, ...] | None] = {t.name: t.resolve(dims) for t in self.inputs}
        for t in self.outputs:
            out[t.name] = t.resolve(dims) if t.symbols <= set(dims) else None
        return out

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """``{tensor: {axis: dim_param}}`` for the ONNX exporter."""
        axes: dict[str, dict[int, str]] = {}
        for t in self.inputs + self.outputs:
            named = {i: onnx_dim_name(e) for i, e in enumerate(t.shape) if not isinstance(e, int)}
            if named:
                axes[t.name] = named
        return axes

    def sample_inputs(self, shape: Which | Mapping[str, int] = "opt", *, seed: int = 0,
                      device: Any = "cpu", float_dtype: Any = None) -> dict[str, Any]:
        """Random inputs at a profile point or explicit root sizes (unnamed roots take ``opt``)."""
        import torch

        dims = self.shape_at(shape)
        self.check_dims(dims)
        gen = torch.Generator().manual_seed(seed)
        out = {}
        for t in self.inputs:
            size = t.resolve(dims)
            dtype = getattr(torch, t.dtype)
            if t.kind == "mask":
                # Right padding, as tokenizers produce; every row keeps at least one token.
                lengths = torch.randint(1, size[-1] + 1, size[:-1], generator=gen)
                lengths.view(-1)[0] = size[-1]  # one full row, so the longest is exercised
                value = (torch.arange(size[-1]) < lengths.unsqueeze(-1)).to(dtype)
            elif not dtype.is_floating_point:
                value = torch.randint(int(t.low), int(t.high), size, generator=gen, dtype=dtype)
            elif t.low is None:
                value = torch.randn(size, generator=gen)
            else:
                value = torch.rand(size, generator=gen) * (t.high - t.low) + t.low
            if dtype.is_floating_point:
                value = value.to(float_dtype or dtype)
            out[t.name] = value.to(device)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "component": self.component,
            "model_type": self.model_type,
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "profile": self.profile.to_dict(),
            "multiples": dict(self.multiples),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ExportSpec:
        return cls(
            component=data["component"],
            model_type=data.get("model_type", ""),
            inputs=tuple(TensorSpec.from_dict(t) for t in data["inputs"]),
            outputs=tuple(TensorSpec.from_dict(t) for t in data["outputs"]),
            profile=ShapeProfile.from_dict(data.get("profile", {})),
            multiples=data.get("multiples", {}),
        )
