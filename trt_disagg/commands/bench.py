"""`trt-disagg bench`: measure SLO attainment and goodput of a running deployment through its OpenAI API.

    trt-disagg bench --url http://127.0.0.1:8000 --dataset sharegpt --rates 0.5,1,2
    trt-disagg bench --url http://127.0.0.1:8000 --dataset fixed --input-len 256 --output-len 32 --search --cores 2

Every argument is checked before the first request (rates > 0, known dataset, SLO values, the endpoint
answers GET /v1/models or /health, and serves one short request the way the runs will); a bad one is a
UserError (exit 2). The resolved arguments are written next to the results (`bench_config.json`).
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

import typer
from pydantic import ValidationError
from rich.console import Console

from trt_disagg.bench.loadgen import OPENAI_DEFAULT_TEMPERATURE
from trt_disagg.bench.metrics import RequestRecord, RunResult, is_refused
from trt_disagg.bench.target import (
    DeploymentTarget,
    check_served_matches,
    deployment_target,
    fetch_served_limits,
)
from trt_disagg.commands.bench_conversations import ConversationOptions
from trt_disagg.config import SLO, load_deployment
from trt_disagg.errors import UserError

log = logging.getLogger(__name__)

DEFAULT_SLO = {"ttft_s": 2.0, "tpot_s": 0.15, "attainment": 0.9}  # configs/smollm2.yaml's


def parse_rates(text: str) -> list[float]:
    """'0.5,1,2' → [0.5, 1.0, 2.0]; every rate must be a number > 0."""
    rates = []
    for part in text.split(","):
        part = part.strip()
        try:
            rate = float(part)
        except ValueError:
            raise UserError(f"--rates: {part!r} is not a number (expected e.g. 0.5,1,2)") from None
        if not rate > 0 or rate == float("inf"):
            raise UserError(f"--rates: every rate must be > 0 requests/s, got {part}")
        rates.append(rate)
    return rates


def resolve_slo(config: Path | None, ttft: float | None, tpot: float | None, attainment: float | None) -> SLO:
    """SLO from the deployment config (when given), each flag overriding; defaults otherwise."""
    values: dict[str, float] = dict(DEFAULT_SLO)
    if config is not None:
        values.update(load_deployment(config).slo.model_dump())
    for key, value in (("ttft_s", ttft), ("tpot_s", tpot), ("attainment", attainment)):
        if value is not None:
            values[key] = value
    try:
        return SLO(**values)
    except ValidationError as exc:
        flags = {"ttft_s": "--ttft", "tpot_s": "--tpot", "attainment": "--attainment"}
        problems = "; ".join(f"{flags.get(str(e['loc'][0]), e['loc'][0])}: {e['msg']}" for e in exc.errors())
        raise UserError(f"bad SLO: {problems}") from None


def load_tokenizer(engine_dir: Path) -> Any:
    """The tokenizer an engine directory carries (`tokenizer/`), or a tokenizer directory itself."""
    from transformers import AutoTokenizer

    for candidate in (engine_dir / "tokenizer", engine_dir):
        if (candidate / "tokenizer_config.json").is_file() or (candidate / "tokenizer.json").is_file():
            return AutoTokenizer.from_pretrained(str(candidate), local_files_only=True)
    raise UserError(f"--tokenizer: no tokenizer in {engine_dir} (expected {engine_dir}/tokenizer/)")


def engine_limits(engine_dir: Path) -> tuple[int, int] | None:
    """(max_input_len, max_output_len) from an engine's config.json, to scale the workload to the model."""
    from trt_disagg.engine_dir import CONFIG_FILE, EngineConfig

    if not (engine_dir / CONFIG_FILE).is_file():
        return None
    limits = EngineConfig.load(engine_dir).limits
    return limits.max_input_len, limits.max_seq_len - limits.max_input_len


def bench_cmd(
    url: str = typer.Option(..., "--url", help="Base URL of the OpenAI-compatible server (the router)"),
    model: str | None = typer.Option(None, "--model", help="Model name (default: the --config deployment's "
                                     "name, else the first of GET /v1/models)"),
    dataset: str = typer.Option("sharegpt", "--dataset", help="sharegpt | humaneval | longbench-synthetic | fixed"),
    rates: str | None = typer.Option(None, "--rates", help="Comma-separated arrival rates (requests/s)"),
    search: bool = typer.Option(False, "--search", help="Search the goodput instead of fixed --rates"),
    num_requests: int = typer.Option(100, "--num-requests", help="Requests per run"),
    ttft: float | None = typer.Option(None, "--ttft", help="TTFT SLO in seconds"),
    tpot: float | None = typer.Option(None, "--tpot", help="TPOT SLO in seconds"),
    attainment: float | None = typer.Option(None, "--attainment", help="Target attainment (0-1]"),
    config: Path | None = typer.Option(None, "--config", help="The deployment YAML being benchmarked: its "
                                       "name, engines' tokenizer, limits and `slo` are the defaults"),
    engines_root: Path | None = typer.Option(None, "--engines-dir", help="--config: engines directory "
                                             "(default: the config's)"),
    cores: int = typer.Option(1, "--cores", help="Cores (GPUs) the deployment uses, for per-core goodput"),
    tokenizer: Path | None = typer.Option(None, "--tokenizer", help="Engine dir: its tokenizer and limits"),
    temperature: float = typer.Option(OPENAI_DEFAULT_TEMPERATURE, "--temperature", help="Sampling temperature "
                                      "sent with every request (default OpenAI's 1.0; 0 is greedy)"),
    allow_errors: bool = typer.Option(False, "--allow-errors", help="Count requests the server refuses (4xx) "
                                      "as SLO misses instead of failing the run"),
    out: Path = typer.Option(Path("runs/bench"), "--out", help="Output directory"),
    arrival: str = typer.Option("poisson", "--arrival", help="poisson | gamma"),
    cv: float = typer.Option(1.0, "--cv", help="Gamma arrivals: coefficient of variation"),
    seed: int = typer.Option(0, "--seed"),
    input_len: int | None = typer.Option(None, "--input-len", help="fixed: prompt tokens"),
    output_len: int | None = typer.Option(None, "--output-len", help="Output tokens of every request"),
    max_input_len: int | None = typer.Option(None, "--max-input-len", help="Prompt token limit (default: "
                                             "the deployment's, from --config, --tokenizer or the server)"),
    max_output_len: int | None = typer.Option(None, "--max-output-len", help="Output token limit (default: "
                                              "what the context leaves after the prompt)"),
    start_rate: float = typer.Option(1.0, "--start-rate", help="--search: first rate probed"),
    max_runs: int = typer.Option(8, "--max-runs", help="--search: most runs made"),
    rel_tol: float = typer.Option(0.1, "--rel-tol", help="--search: stop when hi/lo <= 1 + rel_tol"),
    duration: float | None = typer.Option(None, "--duration", help="Stop sending after this many seconds"),
    timeout: float = typer.Option(300.0, "--timeout", help="Per-request timeout (s)"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
    conversations: int | None = typer.Option(None, "--conversations", help="Multi-turn chats instead of "
                                             "--dataset: this many ShareGPT conversations; --rates are then "
                                             "conversations/s (Poisson starts)"),
    think_time_s: float = typer.Option(2.0, "--think-time-s", help="--conversations: wait after an answer "
                                       "before the next turn (s)"),
    max_turns: int = typer.Option(4, "--max-turns", help="--conversations: user turns per conversation, at most"),
    max_answer_tokens: int = typer.Option(32, "--max-answer-tokens", help="--conversations: answer tokens per "
                                          "turn, at most (the recorded answer's length when shorter)"),
) -> None:
    """Benchmark a deployment: SLO attainment per rate, or the goodput (--search); JSON, CSV, PNG.
    --conversations N: multi-turn chats (each turn resends the history with the answer returned)."""
    from trt_disagg.bench.goodput import SearchSpec

    if conversations is not None and search:
        raise UserError("--conversations runs at the given --rates (conversations/s); --search is not supported")
    if (rates is None) == (not search):
        raise UserError("give either --rates R1,R2,... or --search (one of them, not both)")
    rate_list = parse_rates(rates) if rates is not None else []
    check_arguments(dataset, input_len, output_len, arrival, num_requests, cores, timeout, duration, temperature)
    if conversations is not None:
        ConversationOptions(conversations, think_time_s, max_turns, max_answer_tokens).check()
    target = deployment_target(config, engines_root) if config is not None else None
    slo = resolve_slo(config, ttft, tpot, attainment)
    spec = SearchSpec(target=slo.attainment, start_rps=start_rate, max_runs=max_runs, rel_tol=rel_tol)
    if search:
        spec.validate()
    tok, lengths = resolve_lengths(target, tokenizer, max_input_len, max_output_len)
    settings = {
        "url": url, "model": model if model is not None else (target.model if target else None),
        "config": str(config) if config else None, "dataset": dataset, "rates": rate_list, "search": search,
        "num_requests": num_requests, "slo": slo.model_dump(), "cores": cores, "arrival": arrival, "cv": cv,
        "seed": seed, "input_len": input_len, "output_len": output_len, **lengths,
        "temperature": temperature, "allow_errors": allow_errors,
        "search_spec": vars(spec) if search else None, "duration_s": duration, "timeout_s": timeout,
    }
    if conversations is not None:
        _bench_conversations(settings, slo, tok, target, out, ConversationOptions(
            conversations, think_time_s, max_turns, max_answer_tokens))
        return
    asyncio.run(_bench(settings, slo, spec, tok, target, out, Console(), progress))


def _bench_conversations(settings: dict[str, Any], slo: SLO, tok: Any, target: DeploymentTarget | None, out: Path,
                         opts: ConversationOptions) -> None:
    """The conversation mode (commands/bench_conversations.py), written and checked as a usual run is."""
    from trt_disagg.commands import bench_conversations

    console = Console()
    settings["dataset"] = "sharegpt-conversations"
    runs = bench_conversations.run(settings, slo, opts, tok, out, console, lambda: _check_target(settings, target))
    _write_results(settings, {"conversations": runs}, out, console)
    records = [rec for run in runs for rec in run.records]
    _warn_on_token_counts(records, settings, console)
    _fail_on_refused(records, settings, out)


def check_arguments(dataset: str, input_len: int | None, output_len: int | None, arrival: str, num_requests: int,
                    cores: int, timeout: float, duration: float | None, temperature: float) -> None:
    """Every flag checked on its own before anything is loaded or sent; the message names the flag."""
    from trt_disagg.workload import ARRIVAL_KINDS, WORKLOAD_NAMES

    if dataset not in WORKLOAD_NAMES:
        raise UserError(f"--dataset: unknown {dataset!r}; choose one of {', '.join(WORKLOAD_NAMES)}")
    if dataset == "fixed" and (input_len is None or output_len is None):
        raise UserError("--dataset fixed needs --input-len and --output-len")
    if arrival not in ARRIVAL_KINDS:
        raise UserError(f"--arrival: unknown {arrival!r}; choose one of {', '.join(ARRIVAL_KINDS)}")
    if num_requests < 1:
        raise UserError(f"--num-requests must be >= 1, got {num_requests}")
    if cores < 1:
        raise UserError(f"--cores must be >= 1, got {cores}")
    if not timeout > 0:
        raise UserError(f"--timeout must be > 0, got {timeout}")
    if duration is not None and not duration > 0:
        raise UserError(f"--duration must be > 0, got {duration}")
    if not 0 <= temperature <= 2:  # OpenAI's range; NaN fails too
        raise UserError(f"--temperature must be in [0, 2], got {temperature}")


def resolve_lengths(target: DeploymentTarget | None, tokenizer: Path | None, max_input_len: int | None,
                    max_output_len: int | None) -> tuple[Any, dict[str, Any]]:
    """The tokenizer and token limits the workload is sized with: flags first, then the deployment's.

    Returns the tokenizer (None: text prompts, lengths estimated) and the settings entries `tokenizer`,
    `max_input_len`, `max_output_len`, `max_seq_len`; limits still None are filled from the server later.
    """
    max_seq_len = None
    if tokenizer is None and target is not None:
        tokenizer = target.tokenizer_dir
        if not (tokenizer / "tokenizer").is_dir():
            raise UserError(f"--config: no tokenizer in {tokenizer}/tokenizer (build the engines with "
                            f"`trt-disagg build {target.config}`, or name one with --tokenizer / --engines-dir)")
    if target is not None:
        max_input_len = max_input_len if max_input_len is not None else target.max_input_len
        max_seq_len = target.max_seq_len
    tok = None
    if tokenizer is not None:
        if not tokenizer.is_dir():
            raise UserError(f"--tokenizer: {tokenizer} is not a directory")
        tok = load_tokenizer(tokenizer)
        limits = engine_limits(tokenizer)
        if limits is not None and target is None:
            max_input_len = max_input_len if max_input_len is not None else limits[0]
            max_output_len = max_output_len if max_output_len is not None else limits[1]
    return tok, {"tokenizer": str(tokenizer) if tokenizer else None, "max_input_len": max_input_len,
                 "max_output_len": max_output_len, "max_seq_len": max_seq_len}


async def _bench(settings: dict[str, Any], slo: SLO, spec: Any, tok: Any, target: DeploymentTarget | None,
                 out: Path, console: Console, show_progress: bool) -> None:
    from trt_disagg.bench.goodput import goodput_from_runs
    from trt_disagg.bench.loadgen import preflight, run_rates, search_goodput
    from trt_disagg.bench.progress import RunProgress
    from trt_disagg.workload import load_workload

    await _check_target(settings, target)
    requests = load_workload(settings["dataset"], num_requests=settings["num_requests"], seed=settings["seed"],
                             tokenizer=tok, max_input_len=settings["max_input_len"],
                             max_output_len=settings["max_output_len"], max_seq_len=settings["max_seq_len"],
                             input_len=settings["input_len"], output_len=settings["output_len"])
    await preflight(settings["url"], settings["model"], requests[0], timeout_s=settings["timeout_s"],
                    temperature=settings["temperature"])
    common: dict[str, Any] = {"arrival": settings["arrival"], "cv": settings["cv"], "seed": settings["seed"],
                              "request_timeout_s": settings["timeout_s"], "max_duration_s": settings["duration_s"],
                              "temperature": settings["temperature"]}
    with RunProgress(enabled=show_progress) as bar:
        common.update(on_run=bar.on_run, on_record=bar.on_record)
        if settings["search"]:
            results: Any = await search_goodput(settings["url"], settings["model"], requests, slo, spec=spec,
                                                num_cores=settings["cores"], **common)
        else:
            runs = await run_rates(settings["url"], settings["model"], requests, settings["rates"], slo,
                                   **common)
            results = goodput_from_runs(runs, slo.attainment, settings["cores"])
    _write_results(settings, results, out, console)
    records = [rec for run in _runs_of(results) for rec in run.records]
    _warn_on_token_counts(records, settings, console)
    _fail_on_refused(records, settings, out)


async def _check_target(settings: dict[str, Any], target: DeploymentTarget | None) -> None:
    """The server serves the model (the deployment's, with --config) and its limits fill the ones unset."""
    from trt_disagg.bench.loadgen import check_endpoint

    try:
        settings["model"] = await check_endpoint(settings["url"], settings["model"])
    except UserError as exc:
        if target is None or settings["model"] != target.model or "is not served" not in str(exc):
            raise
        raise UserError(f"--config: {settings['url']} does not serve deployment {target.model!r} of "
                        f"{target.config} ({str(exc).partition('(')[2].rstrip(')')})") from None
    served = await fetch_served_limits(settings["url"], settings["model"])
    if target is not None:
        check_served_matches(target, served, settings["url"])
        return
    if settings["max_input_len"] is None:
        settings["max_input_len"] = served.max_input_len
    if settings["max_seq_len"] is None:
        settings["max_seq_len"] = served.max_model_len


def _write_results(settings: dict[str, Any], results: Any, out: Path, console: Console) -> None:
    from trt_disagg.bench.report import render_goodput_table, render_table, write_report

    out.mkdir(parents=True, exist_ok=True)
    config_path = out / "bench_config.json"
    config_path.write_text(json.dumps(settings, indent=2))
    paths = write_report(results, out)
    console.print(render_table(results))
    goodput_table = render_goodput_table(results)
    if goodput_table is not None:
        console.print(goodput_table)
    t = settings["temperature"]
    console.print(f"sampling: temperature {t:g}" + (" (greedy)" if t == 0 else ""))
    for path in [config_path, *paths]:
        console.print(f"wrote {path}")


def _runs_of(results: Any) -> list[RunResult]:
    from trt_disagg.bench.goodput import GoodputResult

    return list(results.runs) if isinstance(results, GoodputResult) else list(results)


def _warn_on_token_counts(records: list[RequestRecord], settings: dict[str, Any], console: Console) -> None:
    """A prompt count that disagrees with the server's means the lengths were not the deployment's."""
    pairs = [(r.input_len, r.server_input_len) for r in records if r.server_input_len is not None]
    if not pairs:
        return
    ours, theirs = sum(p[0] for p in pairs) / len(pairs), sum(p[1] for p in pairs) / len(pairs)
    if abs(ours - theirs) > 0.1 * theirs:
        how = f"tokenizer {settings['tokenizer']}" if settings["tokenizer"] else "a 4-characters-per-token estimate"
        console.print(f"[yellow]warning:[/yellow] prompts average {ours:.0f} tokens by {how} but {theirs:.0f} "
                      "by the server's count (usage.prompt_tokens): pass --config for the deployment's tokenizer")


def _fail_on_refused(records: list[RequestRecord], settings: dict[str, Any], out: Path) -> None:
    """Requests the server refused as bad (4xx) make the run fail, unless --allow-errors: they measure a
    workload the deployment does not take, not the deployment."""
    refused = [r for r in records if is_refused(r)]
    if refused and not settings["allow_errors"]:
        raise UserError(f"{len(refused)} of {len(records)} requests were refused by {settings['url']} "
                        f"(first: {refused[0].error}); the workload does not fit what the deployment accepts "
                        f"(pass --config for its tokenizer and limits). Results are in {out}; --allow-errors "
                        "counts refused requests as SLO misses instead")


def register(app: typer.Typer) -> None:
    """Add this area's commands to the CLI."""
    app.command("bench")(bench_cmd)
