"""Shared test helpers: build engines once per session, run requests to completion, check for leaks."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from trt_disagg.config import parse_deployment

if TYPE_CHECKING:
    from trt_disagg.engine.weights import LoadedModel


def build_engine(root: Path, source: dict, *, tp: int = 1, pp: int = 1, max_tokens: int = 4096,
                 max_input_len: int = 256, max_seq_len: int = 512, max_batch_size: int = 8,
                 model: LoadedModel | None = None) -> Path:
    """A colocated engine directory for `source` at tp x pp, built with the real build step (from `model`,
    `source` already loaded, when given)."""
    from trt_disagg.engine_build.builder import build_deployment

    name = f"{source['source']}-tp{tp}pp{pp}"
    dep = parse_deployment({
        "name": name,
        "model": source,
        "colocated_servers": {
            "tensor_parallel_size": tp, "pipeline_parallel_size": pp, "max_batch_size": max_batch_size,
            "max_input_len": max_input_len, "max_seq_len": max_seq_len, "max_num_tokens": 2048,
            "kv_cache_config": {"tokens_per_block": 16, "max_tokens": max_tokens},
        },
        "slo": {"ttft_s": 1.0, "tpot_s": 0.1},
    })
    build_deployment(dep, engines_root=root, model=model)
    return root / name / "colocated"


DEVICES = ("cpu", "cuda")


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> str:
    """Where the engine under test runs: "cpu" always; "cuda" skipped where torch sees no CUDA device
    (torch is imported only then, so tests that never ask for a device do not load it)."""
    if request.param == "cuda":
        import torch

        if not torch.cuda.is_available():
            pytest.skip("no CUDA device here")
    return request.param


def need_devices(device: str, world_size: int) -> None:
    """Skip a test whose engine needs `world_size` CUDA devices (one per rank) on a host with fewer."""
    if device == "cpu":
        return
    import torch

    if torch.cuda.device_count() < world_size:
        pytest.skip(f"needs {world_size} CUDA devices, this host has {torch.cuda.device_count()}")


TINY = {"source": "tiny", "seed": 0}
LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]


@pytest.fixture(scope="session")
def tiny_engines(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[int, int], Path]:
    root = tmp_path_factory.mktemp("tiny-engines")
    return {layout: build_engine(root, TINY, tp=layout[0], pp=layout[1]) for layout in LAYOUTS}


GGUF = {"source": "gguf"}


@pytest.fixture(scope="session")
def smollm2_model() -> LoadedModel:
    """The SmolLM2 GGUF loaded once per session: parsing and dequantizing it takes seconds each time."""
    from trt_disagg.config import ModelSource
    from trt_disagg.engine.weights import load_source

    return load_source(ModelSource(**GGUF))


@pytest.fixture(scope="session")
def smollm2_engines(tmp_path_factory: pytest.TempPathFactory,
                    smollm2_model: LoadedModel) -> dict[tuple[int, int], Path]:
    """SmolLM2 at every layout, built once per session."""
    root = tmp_path_factory.mktemp("smollm2-engines")
    return {layout: build_engine(root, GGUF, tp=layout[0], pp=layout[1], max_tokens=2048, model=smollm2_model)
            for layout in LAYOUTS}


def run_to_completion(engine, max_steps: int = 10_000) -> dict[str, list[int]]:
    """Step an engine until it is idle; tokens per request id."""
    out: dict[str, list[int]] = {}
    for _ in range(max_steps):
        if not engine.has_unfinished():
            return out
        for ev in engine.step():
            out.setdefault(ev.request_id, []).append(ev.token_id)
    raise AssertionError(f"engine still busy after {max_steps} steps")


@contextmanager
def step_in_progress(engine) -> Iterator[None]:
    """Hold the engine lock, as a running step does, for the duration of the block."""
    holds, release = threading.Event(), threading.Event()

    def a_long_step() -> None:
        with engine._lock:
            holds.set()
            release.wait(30)

    t = threading.Thread(target=a_long_step)
    t.start()
    try:
        assert holds.wait(30)
        yield
    finally:
        release.set()
        t.join()
