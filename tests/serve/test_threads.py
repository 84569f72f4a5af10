"""``ServeConfig.intra_op_threads`` reaches every engine it loads; the server freezes its loaded heap."""

from __future__ import annotations

import pytest

from fastgen.errors import InvalidArgumentError
from fastgen.serve.config import ServeConfig
from fastgen.serve.service import Service


@pytest.mark.parametrize("bad", [-1, 1025, 1.5, True, "2"])
def test_bad_thread_counts_name_the_option(bad):
    with pytest.raises(InvalidArgumentError, match="intra-op-threads"):
        ServeConfig(model="tiny", intra_op_threads=bad)


def test_every_engine_gets_the_thread_count(tmp_path):
    config = ServeConfig(model="tiny", scorers=("tiny:text-classifier",), backend="torch", device="cpu",
                         cache_dir=str(tmp_path), intra_op_threads=1, warmup=False)
    service = Service(config)
    try:
        service.load()
        engines = [service.generator.unet, service.generator.vae_decoder, service.generator.text_encoder,
                   *(s.engine for s in service.scorers)]
        assert [e.execution.intra_op_threads for e in engines] == [1] * len(engines)
    finally:
        service.close(5)


def test_freeze_heap_hides_the_loaded_objects_from_the_collector():
    import gc

    from fastgen.serve.server import freeze_heap

    try:
        freeze_heap()
        assert gc.get_freeze_count() > 1000
    finally:
        gc.unfreeze()
