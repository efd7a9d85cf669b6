"""`trt-disagg demo CONFIG`: build, profile, serve and benchmark, end to end on this machine.

    build the engines ─▶ load the workload (the engine's tokenizer) ─▶ profile the engine (1 thread)
    ─▶ serve the disaggregated deployment ─▶ time a few hand-offs ─▶ benchmark ─▶ stop
    ─▶ serve + benchmark the colocated baseline on the same cores ─▶ stop
    ─▶ predict both (simulator: profile + hand-off costs) ─▶ tables + JSON/CSV/PNG

The stages are `trt_disagg.demo.run.run_demo`; this module parses flags, shows progress and prints the result.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

from trt_disagg.errors import UserError

if TYPE_CHECKING:
    from rich.status import Status

    from trt_disagg.demo.run import DemoOptions, DemoResult

# Wide enough for the comparison tables when the output is a pipe or a CI log (rich defaults to 80 there).
out = Console(width=120)
err = Console(stderr=True)


def _rates(text: str) -> list[float]:
    try:
        rates = [float(r) for r in text.split(",") if r.strip()]
    except ValueError:
        raise UserError(f"--rates {text!r}: expected comma-separated numbers") from None
    if not rates or min(rates) <= 0:
        raise UserError("--rates: give one or more rates > 0 (requests/s)")
    return sorted(rates)


def demo_cmd(
    config: Annotated[Path, typer.Argument(help="a deployment with context, generation and colocated servers")],
    workload: Annotated[str, typer.Option(help="sharegpt | humaneval | longbench-synthetic | fixed")] = "fixed",
    input_len: Annotated[int, typer.Option(help="fixed workload: prompt tokens")] = 512,
    output_len: Annotated[int, typer.Option(help="output tokens (fixed; ignore_eos)")] = 16,
    rates: Annotated[str, typer.Option(help="comma-separated request rates, req/s")] = "0.15,0.3,0.5,0.7,0.9",
    num_requests: Annotated[int, typer.Option(help="requests per rate")] = 40,
    seed: int = 0,
    out_dir: Annotated[Path, typer.Option("--out", help="results: JSON, CSV, PNG")] = Path("runs/demo"),
    engines_dir: Annotated[Path | None, typer.Option("--engines-dir")] = None,
) -> None:
    """Disaggregated vs colocated on this machine: build, serve, benchmark, predict, compare."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from trt_disagg.commands.build import build_with_progress
    from trt_disagg.demo.run import DemoOptions, run_demo

    started = time.perf_counter()
    options = DemoOptions(config, workload, input_len, output_len, tuple(_rates(rates)), num_requests, seed, out_dir,
                          engines_dir)
    progress = _ConsoleProgress()
    try:
        result = run_demo(options, lambda dep, root: build_with_progress(dep, engines_root=root), progress)
    finally:
        progress.stop_status()
    _print_result(result, options)
    out.print(f"demo finished in {time.perf_counter() - started:.0f} s; nothing left running")


class _ConsoleProgress:
    """The demo's progress on stderr: a rule per stage, a spinner while profiling, notes as they come."""

    def __init__(self) -> None:
        self._status: Status | None = None

    def step(self, number: int, total: int, title: str) -> None:
        self.stop_status()
        err.rule(f"{number}/{total} {title}")

    def profiling(self, done: int, total: int) -> None:
        if self._status is None:
            self._status = err.status("profiling")
            self._status.start()
        self._status.update(f"profiling {done}/{total}")

    def note(self, text: str) -> None:
        self.stop_status()
        err.print(text)

    def stop_status(self) -> None:
        if self._status is not None:
            self._status.stop()
            self._status = None


def _print_result(result: DemoResult, options: DemoOptions) -> None:
    from trt_disagg.demo.report import goodput_table, prediction_table
    from trt_disagg.demo.served_steps import step_ratio_table

    slo = result.slo
    out.print(goodput_table(result.outcomes, slo.attainment, f"TTFT <= {slo.ttft_s:g} s and TPOT <= {slo.tpot_s:g} s"))
    out.print(prediction_table(result.outcomes))
    for note in result.handoff_notes:
        out.print(note)
    out.print(step_ratio_table(result.served_steps))
    requests = result.requests
    out.print(f"workload: {options.workload}, {len(requests)} requests per rate, "
              f"mean input {sum(r.input_len for r in requests) / len(requests):.0f} tokens, "
              f"output {options.output_len} tokens; rates {list(result.rates)} req/s (Poisson)")
    for p in result.paths:
        out.print(f"  wrote {p}")


def register(app: typer.Typer) -> None:
    """Add `demo` to the CLI."""
    app.command("demo")(demo_cmd)
