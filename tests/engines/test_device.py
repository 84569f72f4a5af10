"""Device resolution and fingerprints."""

from __future__ import annotations

import platform

import pytest
import torch

from fastgen.engines.device import device_fingerprint, resolve_device
from fastgen.errors import InvalidArgumentError, UnsupportedError


def test_resolve(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(UnsupportedError, match="device 'cuda'.*no CUDA GPU"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda:1")


@pytest.mark.parametrize("bad", ["gpu", "tpu", "cpu:0", "", 3, None])
def test_bad_devices(bad):
    with pytest.raises(InvalidArgumentError, match="device"):
        resolve_device(bad)


def test_cpu_fingerprint_never_touches_cuda(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("CUDA touched")

    for name in ("is_available", "get_device_name", "get_device_capability", "current_device", "init"):
        monkeypatch.setattr(torch.cuda, name, boom)
    assert device_fingerprint("cpu") == {"kind": "cpu", "arch": platform.machine()}
    assert device_fingerprint(torch.device("cpu")) == device_fingerprint("cpu")
    assert resolve_device("cpu").type == "cpu"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_fingerprint():
    fp = device_fingerprint("cuda")
    major, minor = torch.cuda.get_device_capability(0)
    assert fp == {"kind": "cuda", "name": torch.cuda.get_device_name(0), "capability": f"{major}.{minor}"}
