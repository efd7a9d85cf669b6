"""How many KV tokens an instance holds: what is left of its GPUs' memory after the weights.

    kv_tokens = blocks_of_16( (util * memory * tp * pp - weight_bytes) * (1 - reserve) / kv_bytes_per_token )

with DistServe's constants (util 0.95, 1% reserve for activations, 16-token blocks). Where the DistServe
artifact publishes the figure (`data/a100_opt_kv_capacity.csv`) that figure is used; the formula lands
within ~7% of the published rows. `None` means the model does not fit: such configurations are never proposed.
"""

from __future__ import annotations

import csv
import functools
import io
from importlib import resources

from trt_disagg.planner.hardware import GPUSpec
from trt_disagg.planner.models import ModelSpec

MEMORY_UTILISATION = 0.95
ACTIVATION_RESERVE = 0.01
TOKENS_PER_BLOCK = 16
# A single instance needs room for at least one long request, or it cannot serve anything.
MIN_KV_TOKENS = 2048


def read_data_csv(name: str) -> list[dict[str, str]]:
    """Rows of a CSV in trt_disagg/planner/data/ ('#' lines are the citation header)."""
    text = resources.files("trt_disagg.planner").joinpath("data", name).read_text(encoding="utf-8")
    lines = [line for line in io.StringIO(text) if line.strip() and not line.startswith("#")]
    return list(csv.DictReader(lines))


@functools.lru_cache(maxsize=1)
def published_kv_capacity() -> dict[tuple[str, str, int, int], int]:
    return {(r["model"], r["gpu"], int(r["tp"]), int(r["pp"])): int(r["max_kv_tokens"])
            for r in read_data_csv("a100_opt_kv_capacity.csv")}


def can_shard(model: ModelSpec, tp: int, pp: int) -> bool:
    """TP splits attention heads evenly; PP needs at least one layer per stage."""
    return model.shape.num_heads % tp == 0 and 1 <= pp <= model.shape.num_layers


def kv_capacity_tokens(model: ModelSpec, gpu: GPUSpec, tp: int, pp: int) -> int | None:
    """KV capacity of one instance with tp*pp GPUs, or None when the weights (plus a minimum KV) do not fit."""
    if not can_shard(model, tp, pp):
        return None
    published = published_kv_capacity().get((model.name, gpu.name, tp, pp))
    if published is not None:
        return published
    free = MEMORY_UTILISATION * gpu.memory_bytes * tp * pp - model.weight_bytes
    if free <= 0:
        return None
    tokens = int(free * (1 - ACTIVATION_RESERVE) / model.kv_bytes_per_token)
    tokens -= tokens % TOKENS_PER_BLOCK
    return tokens if tokens >= MIN_KV_TOKENS else None
