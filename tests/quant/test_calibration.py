"""calibrate: per-channel activation maxima, forward-loop forms, clean-up; SmoothQuant's effect."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fastgen.errors import InvalidArgumentError, VerificationError
from fastgen.quant import Int8DynamicConfig, Int8StaticConfig, QuantLinear, calibrate, quantize_, sqnr_db
from fastgen.quant.calibration import AMAX_ATTR, activation_amax


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.down = nn.Conv2d(6, 8, 1, stride=2)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        return self.fc(self.down(x * scale).permute(0, 2, 3, 1))


def test_records_per_channel_amax_of_what_each_layer_sees():
    torch.manual_seed(0)
    net = Net()
    xs = [torch.randn(2, 6, 5, 5), torch.randn(1, 6, 7, 3) * 3]
    stats = calibrate(net, xs)
    assert set(stats) == {"down", "fc"}
    seen = torch.stack([x[:, :, ::2, ::2].abs().amax(dim=(0, 2, 3)) for x in xs]).amax(0)  # stride 2: subsampled
    torch.testing.assert_close(stats["down"], seen)
    with torch.no_grad():
        fc_in = [net.down(x).permute(0, 2, 3, 1).reshape(-1, 8) for x in xs]
    torch.testing.assert_close(stats["fc"], torch.cat(fc_in).abs().amax(0))
    assert activation_amax(net.fc) is stats["fc"]
    assert not net.fc._forward_pre_hooks and not net.down._forward_pre_hooks  # hooks removed


def test_forward_loop_forms_and_reset():
    torch.manual_seed(0)
    net = Net()
    x = torch.randn(2, 6, 4, 4)
    a = calibrate(net, lambda m: m(x))["fc"].clone()
    b = calibrate(net, [{"x": x}])["fc"].clone()
    c = calibrate(net, [(x, 1.0)])["fc"].clone()
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, c)
    bigger = calibrate(net, [(x, 0.5)], reset=False)["fc"]  # keeps the earlier, larger maxima
    torch.testing.assert_close(bigger, a)
    smaller = calibrate(net, [(x, 0.5)])["fc"]  # reset: only the new pass
    assert bool((smaller < a).all())
    with pytest.raises(InvalidArgumentError, match="forward_loop"):
        calibrate(net, 42)


def test_hooks_are_removed_when_the_loop_fails_and_non_finite_inputs_are_refused():
    net = Net()

    def boom(module: nn.Module) -> None:
        module(torch.randn(1, 6, 2, 2))
        raise RuntimeError("loop failed")

    with pytest.raises(RuntimeError, match="loop failed"):
        calibrate(net, boom)
    assert not net.fc._forward_pre_hooks
    with pytest.raises(VerificationError, match="non-finite"):
        calibrate(net, [torch.full((1, 6, 2, 2), float("inf"))])


def test_unseen_layers_are_reported_and_refused_by_quantize(caplog):
    net = nn.ModuleDict({"used": nn.Linear(4, 4), "unused": nn.Linear(4, 4)})
    calibrate(net, lambda m: m["used"](torch.randn(3, 4)))
    assert AMAX_ATTR in net["used"].__dict__ and AMAX_ATTR not in net["unused"].__dict__
    assert "never ran" in caplog.text
    with pytest.raises(InvalidArgumentError, match="'unused'"):
        quantize_(net, Int8StaticConfig())


def _outlier_layer() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A layer whose input has a few huge channels, as LLM/diffusion activations do."""
    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(256, 128)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(128, 256, generator=g) / 16)
    gain = torch.ones(256)
    gain[torch.randperm(256, generator=g)[:6]] = 60.0  # 6 outlier channels
    calib = torch.randn(64, 256, generator=g) * gain
    test = torch.randn(128, 256, generator=g) * gain
    return nn.Sequential(lin), calib, test


# Per-token scales gain most (measured +11.7 dB here); one per-tensor scale stays set by the largest
# smoothed channel, so static gains ~1.5 dB at best (alpha 0.3) on this layer.
@pytest.mark.parametrize(("cls", "alpha", "gain_db"), [(Int8DynamicConfig, 0.5, 6.0), (Int8StaticConfig, 0.3, 1.0)])
def test_smoothquant_improves_sqnr_on_a_layer_with_outlier_channels(cls, alpha, gain_db):
    model, calib, test = _outlier_layer()
    ref = model(test).detach()
    results = {}
    for smooth in (False, True):
        m = nn.Sequential(nn.Linear(256, 128))
        m.load_state_dict(model.state_dict())
        calibrate(m, [calib])
        quantize_(m, cls(smoothquant=smooth, alpha=alpha), skip=())
        assert isinstance(m[0], QuantLinear)
        results[smooth] = sqnr_db(ref, m(test))
    assert results[True] > results[False] + gain_db, results
