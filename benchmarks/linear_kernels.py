"""The engine's weight matmuls on the CPU: oneDNN's prepacked weights vs `F.linear`, side by side in one run.

    .venv/bin/python benchmarks/linear_kernels.py [--threads 1] [--rows 1,2,3,4,6,8,64,512] [--repeats 5]

One "pass" is every weight matmul of one engine step of SmolLM2-135M (per layer the fused q/k/v, o, the fused
gate/up and down; then the LM head), each weight its own tensor as in the engine, so a pass reads all the
weights from memory as a decode step does. Rows are the step's tokens: a decode step has one per sequence,
a prefill step one per prompt token. Prints the fastest of --repeats passes per kernel and the ratio.
Target: prepacked no slower than `F.linear` at every row count, and its time never falls as rows grow from 1
to 8 by more than noise (a decode step must not get cheaper by adding a sequence).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from trt_disagg.config import ModelSource
from trt_disagg.contract import ModelShape
from trt_disagg.engine.linear import Linear, prepacking_works
from trt_disagg.engine.weights import peek_shape

console = Console()


def weight_shapes(shape: ModelShape) -> list[tuple[int, int]]:
    """(out, in) of every weight matmul in one step, in the engine's order (model.py fuses q/k/v and gate/up)."""
    h, d = shape.hidden_size, shape.head_dim
    per_layer = [((shape.num_heads + 2 * shape.num_kv_heads) * d, h), (h, shape.num_heads * d),
                 (2 * shape.intermediate_size, h), (h, shape.intermediate_size)]
    return per_layer * shape.num_layers + [(shape.vocab_size, h)]


def best_pass_s(matmuls: list[Callable[[torch.Tensor], torch.Tensor]], inputs: list[torch.Tensor],
                repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats + 1):  # the first pass warms the kernels' caches and is dropped by the min
        start = time.perf_counter()
        for mm, x in zip(matmuls, inputs, strict=True):
            mm(x)
        best = min(best, time.perf_counter() - start)
    return best


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the demo serves 1 per rank)")
    ap.add_argument("--rows", default="1,2,3,4,6,8,64,512")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not prepacking_works():
        raise SystemExit("this torch cannot prepack weights for oneDNN: the engine uses F.linear here")
    shape = peek_shape(ModelSource(source="gguf"))
    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(out, inp, generator=gen) * inp ** -0.5 for out, inp in weight_shapes(shape)]
    packed = [Linear(w) for w in weights]
    dense = [lambda x, w=w: F.linear(x, w) for w in weights]
    table = Table(title=f"One step's weight matmuls, SmolLM2-135M fp32, {args.threads} thread(s), fastest of "
                        f"{args.repeats}")
    for col in ("rows", "F.linear ms", "prepacked ms", "F.linear / prepacked"):
        table.add_column(col, justify="right")
    with torch.inference_mode():
        for rows in (int(r) for r in args.rows.split(",")):
            inputs = [torch.randn(rows, w.shape[1], generator=gen) for w in weights]
            d = best_pass_s(dense, inputs, args.repeats)
            p = best_pass_s(list(packed), inputs, args.repeats)
            table.add_row(str(rows), f"{d * 1e3:.1f}", f"{p * 1e3:.1f}", f"{d / p:.2f}x")
            console.print(f"rows {rows}: F.linear {d * 1e3:.1f} ms, prepacked {p * 1e3:.1f} ms")
    console.print(table)


if __name__ == "__main__":
    main()
