"""`trt-disagg demo CONFIG`: build, profile, serve and benchmark, end to end on this machine.

    build the engines ─▶ load the workload (the engine's tokenizer) ─▶ profile the engine (1 thread)
    ─▶ SLOs and rates from the profile ─▶ serve the disaggregated deployment ─▶ time hand-offs ─▶ benchmark
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


def _rates(text: str | None) -> tuple[float, ...] | None:
    if text is None:
        return None
    return tuple(_parse_rates(text))


def _parse_rates(text: str) -> list[float]:
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
    rates: Annotated[str | None, typer.Option(help="comma-separated request rates, req/s (default: from the "
                                                   "profiled prefill capacity)")] = None,
    num_requests: Annotated[int | None, typer.Option(help="requests per rate (default 20; --full 40)")] = None,
    full: Annotated[bool, typer.Option("--full", help="the thorough run: full profile grid, five rates of 40 "
                                                      "requests (default: quick goodput bisection)")] = False,
    fixed_slo: Annotated[bool, typer.Option("--fixed-slo", help="use the config's SLO instead of deriving it "
                                                                "from the profile")] = False,
    # the defaults are demo.targets' TPOT_MULTIPLE and TTFT_MULTIPLE (a test holds them equal), written out
    # so that the CLI does not import the demo (numpy, the planner) to show its help
    tpot_multiple: Annotated[float, typer.Option(help="TPOT SLO = this x profiled decode step")] = 2.0,
    ttft_multiple: Annotated[float, typer.Option(help="TTFT SLO = this x profiled prefill of the prompt")] = 4.0,
    temperature: Annotated[float, typer.Option(help="sent with every request: 0 greedy (the default; what the "
                                                    "profile times), e.g. 1.0 for OpenAI's default sampling")] = 0.0,
    seed: int = 0,
    out_dir: Annotated[Path, typer.Option("--out", help="results: JSON, CSV, PNG")] = Path("runs/demo"),
    engines_dir: Annotated[Path | None, typer.Option("--engines-dir")] = None,
) -> None:
    """Disaggregated vs colocated on this machine: build, serve, benchmark, predict, compare."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from trt_disagg.commands.build import build_with_progress
    from trt_disagg.demo.run import DemoOptions, run_demo
    from trt_disagg.demo.targets import SloRule

    started = time.perf_counter()
    rule = None if fixed_slo else SloRule(tpot_multiple=tpot_multiple, ttft_multiple=ttft_multiple)
    options = DemoOptions(config, workload, input_len, output_len, _rates(rates), num_requests, seed, out_dir,
                          engines_dir, full=full, slo_rule=rule, temperature=temperature)
    progress = _ConsoleProgress()
    try:
        result = run_demo(options, lambda dep, root: build_with_progress(dep, engines_root=root), progress)
    finally:
        progress.stop_status()
    _print_result(result, options)
    out.print(f"demo finished in {time.perf_counter() - started:.0f} s ({'full' if full else 'quick'}); "
              "nothing left running")


class _ConsoleProgress:
    """The demo's progress on stderr: a rule per stage, a spinner while profiling, notes as they come."""

    def __init__(self) -> None:
        self._status: Status | None = None
        self._started = time.perf_counter()

    def step(self, number: int, total: int, title: str) -> None:
        self.stop_status()
        elapsed = int(time.perf_counter() - self._started)
        err.rule(f"{number}/{total} {title} [{elapsed // 60}:{elapsed % 60:02d} in]")

    def profiling(self, done: int, total: int) -> None:
        if not err.is_terminal:  # a log or a pipe: a plain line every tenth of the grid, no spinner
            if done == total or done % max(1, total // 10) == 0:
                err.print(f"  profiling {done}/{total} grid rounds")
            return
        if self._status is None:
            self._status = err.status("profiling")
            self._status.start()
        self._status.update(f"profiling {done}/{total} grid rounds")

    def note(self, text: str) -> None:
        self.stop_status()
        err.print(text)

    def stop_status(self) -> None:
        if self._status is not None:
            self._status.stop()
            self._status = None


def _print_result(result: DemoResult, options: DemoOptions) -> None:
    from trt_disagg.demo.handoff import handoff_table, p50
    from trt_disagg.demo.report import goodput_table, prediction_table
    from trt_disagg.demo.served_steps import step_ratio_table

    slo = result.slo
    out.print(result.slo_rule)
    out.print(goodput_table(result.outcomes, slo.attainment, f"TTFT <= {slo.ttft_s:g} s and TPOT <= {slo.tpot_s:g} s"))
    out.print(prediction_table(result.outcomes))
    if result.handoffs:
        h = result.handoffs
        beyond = [s.beyond_first_step_s for s in h if s.phases]
        out.print(handoff_table(h, f"KV hand-off, {len(h)} warm probes sent alone (p50 per phase)"))
        out.print(f"hand-off p50 {p50([s.total_s for s in h]) * 1e3:.0f} ms; beyond its first decode step "
                  f"{p50(beyond) * 1e3:.0f} ms (profiled decode step at batch 1: {result.decode_step_s * 1e3:.0f} ms)")
    for note in result.handoff_notes:
        out.print(note)
    out.print(step_ratio_table(result.served_steps))
    out.print(_verdict(result))
    requests = result.requests
    out.print(f"workload: {options.workload}, {len(requests)} requests per rate, "
              f"mean input {sum(r.input_len for r in requests) / len(requests):.0f} tokens, "
              f"output {options.output_len} tokens, "
              + ("greedy (temperature 0)" if options.temperature == 0 else f"temperature {options.temperature:g}")
              + f"; rates run {[round(r, 3) for r in result.rates]} req/s "
              f"(Poisson); prefill capacity {result.capacity_rps:.3g} req/s per core")
    for p in result.paths:
        out.print(f"  wrote {p}")


def _verdict(result: DemoResult) -> str:
    """The one line that says what the tables mean, busy machine and missing baseline included."""
    busy = result.busy
    lines = []
    if busy is not None and (busy.is_busy or busy.profile_was_busy):
        when = "while serving" if busy.is_busy else "while profiling (served steps ran faster)"
        lines.append(f"the machine was busy {when}: {busy.describe()}; the prediction used the served step "
                     "times (the profiled latency model scaled per phase)")
    elif busy is not None and busy.use_served_times:
        lines.append(f"{busy.describe()}: the prediction used the served step times (the profiled latency "
                     "model scaled per phase by the served total)")
    labels = [o.variant.label for o in result.outcomes]
    goodputs = [result.goodputs[label].goodput_rps for label in labels]
    if max(goodputs) == 0:
        lines.append("no result: neither deployment reached the attainment target at any rate run"
                     + (" on this busy machine" if busy is not None and busy.is_busy else "")
                     + "; rerun on a quiet machine, or with lower --rates")
    elif result.ratio is None:
        lines.append(f"{labels[0]} reached {goodputs[0]:.3g} req/s; {labels[-1]} reached the target at no rate "
                     "run (its goodput is below the lowest rate): the ratio is > the table's numbers allow")
    else:
        lines.append(f"per-core goodput ratio {labels[0]} / {labels[-1]}: {result.ratio:.2f}x")
    return "\n".join(lines)


def register(app: typer.Typer) -> None:
    """Add `demo` to the CLI."""
    app.command("demo")(demo_cmd)
