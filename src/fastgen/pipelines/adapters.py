"""A generator's LoRA adapters (:mod:`fastgen.lora`, docs/lora.md): the methods :class:`Generator`
gets from :class:`AdapterMethods`, over its UNet and text-encoder engines."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastgen.errors import UnsupportedError


class AdapterMethods:
    """``load_lora`` / ``set_adapters`` / ``unload_lora`` for a pipeline with ``unet``, ``text_encoder``
    and ``text_encoder_2`` engines; the manager is made on first use."""

    def _lora_manager(self, base: Any = None) -> Any:
        """The adapter manager over the UNet and text encoder engines (made on first use)."""
        from fastgen.lora import AdapterManager

        manager = self.__dict__.get("_lora")
        if manager is None and getattr(self, "pipeline", "sd") not in ("sd", "sdxl"):
            # LoRA names map onto UNet and CLIP modules; SD3/FLUX/PixArt LoRAs target transformer blocks.
            raise UnsupportedError(f"LoRA adapters on a {self.pipeline} generator are not supported yet "
                                   "(SD 1.x/2.x and SDXL: docs/lora.md)")
        if manager is None:
            engines = {"unet": self.unet, "text_encoder": self.text_encoder, "text_encoder_2": self.text_encoder_2}
            bases = {c: base for c in engines} if base is not None else None
            manager = self.__dict__["_lora"] = AdapterManager(engines, base=bases)
        return manager

    def load_lora(self, path: Any, name: str | None = None, *, weight: float = 1.0, base: Any = None) -> str:
        """Load a LoRA (a ``.safetensors`` file in diffusers/PEFT or kohya format, or a folder as diffusers'
        ``save_lora_weights`` writes it) under ``name`` (default: the file's stem) and apply it at ``weight``
        together with the adapters active now. ``base``: for TensorRT engines only, the model they were
        built from (its weights are the base of the refits). Returns the adapter's name."""
        return self._lora_manager(base).load(path, name=name, weight=weight).name

    def set_adapters(self, names: str | Sequence[str] | None, weights: float | Sequence[float] | None = None) -> None:
        """Apply exactly these loaded adapters at these scales (diffusers' ``set_adapters(names,
        adapter_weights=weights)``); an empty list runs the base weights. No engine is rebuilt."""
        self._lora_manager().set_adapters(names, weights)

    def unload_lora(self, name: str | None = None) -> None:
        """Remove one adapter (None: all of them); the others stay applied."""
        self._lora_manager().unload(name)

    @property
    def adapter_manager(self) -> Any:
        """The :class:`~fastgen.lora.AdapterManager` over the UNet and text encoders (None until a LoRA
        is loaded): what :class:`fastgen.Runtime` swaps per request."""
        return self.__dict__.get("_lora")

    @property
    def active_adapters(self) -> dict[str, float]:
        """Adapter name -> scale of the adapters applied now."""
        manager = self.__dict__.get("_lora")
        return {} if manager is None else dict(zip(manager.selection.names, manager.selection.weights, strict=True))


__all__ = ["AdapterMethods"]
