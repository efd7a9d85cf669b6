"""The online SLA planner on a live deployment: a workload shift, a static 1P2D run vs an autoscaled one.

    build tiny engines (1 torch thread per instance) ─▶ profile the engine (what `trt-disagg profile` writes)
    ─▶ the same open-loop load twice, each on a fresh deployment started 1P2D (budget: 3 instances):
        phase A  short prompts, long answers   (decode-heavy)
        phase B  long prompts, short answers   (prefill-heavy: one prefill instance is the bottleneck)
      static:      no controller
      autoscaled:  the controller of `serve --autoscale` (AutoscaleRunner + LocalClusterActuator) every
                   --interval-s over the last --window-s; its decisions are its own (prediction + measurement)
    ─▶ when phase B began, when the controller decided and when the new shape was serving; every request
       checked (stream complete, record DONE, token count, the same text in both runs at temperature 0);
       SLO attainment before and after the switch in both runs; a plot of instances and attainment.

All instances, the router, Redis and this client share the host's cores (2 on the reference machine): the
second prefill instance helps because the decode instances idle in phase B, not because cores are added.
Run under the shared lock: `flock /tmp/trtd-bench.lock .venv/bin/python benchmarks/autoscale_bench.py`.
Every process it starts is stopped. Prints a table; writes JSON with --out (and a PNG next to it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import redis
import yaml

from trt_disagg.bench.loadgen import DONE, sse_data
from trt_disagg.config import load_deployment
from trt_disagg.contract import Role
from trt_disagg.controller.from_deployment import build_autoscale
from trt_disagg.controller.local_actuator import LocalClusterActuator
from trt_disagg.controller.policy import Decision
from trt_disagg.controller.runner import AutoscaleRunner, decision_line
from trt_disagg.keys import record_key
from trt_disagg.triton.cluster import LocalCluster
from trt_disagg.triton.launch import free_port

REPO = Path(__file__).resolve().parents[1]
MAX_INPUT_LEN = 1024
SAMPLE_S = 0.25  # how often the serving shape is read for the timeline
BIN_S = 10.0  # attainment over time: requests grouped by when they were sent


@dataclass
class Sent:
    phase: str
    index: int
    input_len: int
    output_len: int
    sent_s: float  # seconds after the run began
    ttft_s: float | None = None
    tpot_s: float | None = None
    tokens: int | None = None  # completion tokens the router reported (usage)
    text: str = ""
    request_id: str | None = None
    error: str | None = None
    state: str | None = None  # the router's record: DONE for every request that completed


@dataclass
class Run:
    name: str
    sent: list[Sent] = field(default_factory=list)
    decisions: list[dict] = field(default_factory=list)
    shapes: list[tuple[float, int, int]] = field(default_factory=list)  # (s, prefill, decode) serving, on change


def make_config(tmp: Path, args: argparse.Namespace, profile: Path | None) -> Path:
    """1P2D of the tiny model, one torch thread per instance, prompts up to MAX_INPUT_LEN tokens (phase B's
    long prompts make one prefill instance the bottleneck; the SLO and the budget are what a user would set)."""
    data = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    data.pop("colocated_servers")
    limits = {"max_input_len": MAX_INPUT_LEN, "max_seq_len": MAX_INPUT_LEN + 64, "max_num_tokens": 2 * MAX_INPUT_LEN}
    data["context_servers"].update(tensor_parallel_size=1, max_batch_size=4, **limits)
    data["generation_servers"].update(num_instances=2, pipeline_parallel_size=1, **limits)
    data["engines_dir"] = str(tmp / "engines")
    data["router"]["port"] = free_port()
    data["slo"] = {"ttft_s": args.ttft_s, "tpot_s": args.tpot_s, "attainment": 0.9}
    data["autoscale"] = {"interval_s": args.interval_s, "cooldown_s": args.cooldown_s, "window_s": args.window_s,
                         "min_requests": 10, "max_instances": 3, "drain_timeout_s": 30.0,
                         "startup_timeout_s": 120.0, **({"profile": str(profile)} if profile else {})}
    path = tmp / "tiny-autoscale.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


# What `trt-disagg profile ENGINE --batch-sizes 1,2,4,8,16,32 --lengths 16,256,1000 --repeats 2` measures:
# prefill up to the long prompts, decode steps up to the decode instances' batch.
PROFILE_GRID = {"batch_sizes": (1, 2, 4, 8, 16, 32), "prompt_lens": (16, 256, 1000), "repeats": 2, "warmup": 1,
                "decode_steps": 4}


def profile_engine_dir(engine_dir: Path, out_dir: Path) -> Path:
    """The tiny engine's latency model, measured here with the threads an instance has (one)."""
    from trt_disagg.engine.llm_engine import LLMEngine
    from trt_disagg.planner.profile import ProfileGrid, fit_profile, profile_engine, write_profile

    grid = ProfileGrid(**PROFILE_GRID)  # type: ignore[arg-type]  # the decode engine: batches up to 32
    with LLMEngine.from_engine_dir(engine_dir, threads_per_rank=1, block_reuse=False) as engine:  # compute only
        data = profile_engine(engine, grid)
        fit = fit_profile(data, engine.config.tp, "tiny", "cpu", f"profile:{engine_dir}")
    write_profile(out_dir, data, fit, grid, str(engine_dir))
    return out_dir / "profile.json"


def workload(args: argparse.Namespace) -> list[tuple[float, str, list[int], int]]:
    """(send time, phase, prompt ids, output tokens): Poisson arrivals, phase A then phase B."""
    rng = random.Random(0)
    out, t = [], 0.0
    for phase, duration, rate, in_len, out_len in (("A", args.phase_a_s, args.rate_a, 16, 48),
                                                   ("B", args.phase_b_s, args.rate_b, args.prompt_b, 2)):
        end = t + duration
        while True:
            t += rng.expovariate(rate)
            if t >= end:
                t = end
                break
            out.append((t, phase, [rng.randrange(300, 40000) for _ in range(in_len)], out_len))
    return out


async def send(http: httpx.AsyncClient, url: str, rec: Sent, prompt: list[int]) -> None:
    """One greedy streaming completion; TTFT at the first text, TPOT over the tokens the router counted."""
    body = {"model": "tiny", "prompt": prompt, "max_tokens": rec.output_len, "min_tokens": rec.output_len,
            "ignore_eos": True, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    start, first, last, text, done = time.monotonic(), None, None, [], False
    try:
        async with http.stream("POST", f"{url}/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                rec.error = f"HTTP {resp.status_code}"
                return
            async for data in sse_data(resp):
                if data == DONE:
                    done = True
                else:
                    chunk = json.loads(data)
                    if "error" in chunk:
                        rec.error = str(chunk["error"])
                        return
                    rec.request_id = rec.request_id or chunk.get("id")
                    if chunk.get("usage"):
                        rec.tokens = chunk["usage"]["completion_tokens"]
                    for c in chunk.get("choices") or []:
                        if c.get("text"):
                            text.append(c["text"])
                            last = time.monotonic() - start
                            first = last if first is None else first
    except httpx.HTTPError as exc:
        rec.error = type(exc).__name__
    if rec.error is None and not done:
        rec.error = "stream cut before [DONE]"
    rec.text = "".join(text)
    rec.ttft_s = first
    if first is not None and last is not None and rec.tokens:
        rec.tpot_s = (last - first) / (rec.tokens - 1) if rec.tokens > 1 else 0.0


async def drive(url: str, load: list[tuple[float, str, list[int], int]], run: Run, t0: float) -> None:
    async with httpx.AsyncClient(timeout=httpx.Timeout(300.0)) as http:
        tasks = []
        for i, (at, phase, prompt, out_len) in enumerate(load):
            await asyncio.sleep(max(0.0, t0 + at - time.monotonic()))  # the arrival process: open loop
            rec = Sent(phase, i, len(prompt), out_len, time.monotonic() - t0)
            run.sent.append(rec)
            tasks.append(asyncio.create_task(send(http, url, rec, prompt)))
        await asyncio.gather(*tasks)


def one_run(cfg: Path, name: str, load: list, autoscale: bool) -> Run:
    """A fresh deployment, the load, every record's final state; the controller too when `autoscale`."""
    dep = load_deployment(cfg)
    run = Run(name)
    cluster = LocalCluster(dep, config_path=cfg)
    runner, done = None, threading.Event()
    try:
        cluster.start()
        t0, wall0 = time.monotonic(), time.time()
        watch = threading.Thread(target=_watch_shape, args=(cluster, run, t0, done), daemon=True)
        watch.start()
        if autoscale:
            setup = build_autoscale(dep)

            def decided(d: Decision) -> None:
                run.decisions.append({**d.to_json(), "t_s": round(d.at_s - wall0, 2)})
                print(f"  [{d.at_s - wall0:6.1f} s] {decision_line(d)}", flush=True)

            runner = AutoscaleRunner(str(cluster.redis_url), setup.controller,
                                     LocalClusterActuator(cluster, setup.actuator), decided)
            runner.start()
        assert cluster.router_url is not None
        asyncio.run(drive(cluster.router_url, load, run, t0))
        client = redis.Redis.from_url(str(cluster.redis_url), decode_responses=True)
        for rec in run.sent:
            state = client.hget(record_key(rec.request_id), "state") if rec.request_id else None
            rec.state = None if state is None else str(state)
        client.close()
    finally:
        done.set()
        if runner is not None:
            runner.stop()
        cluster.stop()
    return run


def _watch_shape(cluster: LocalCluster, run: Run, t0: float, done: threading.Event) -> None:
    """The serving shape (instances that are up and not retiring) whenever it changes."""
    while not done.wait(SAMPLE_S):  # reading another thread's process table: nothing to wait on
        shape = (len(cluster.serving(Role.PREFILL)), len(cluster.serving(Role.DECODE)))
        if not run.shapes or run.shapes[-1][1:] != shape:
            run.shapes.append((round(time.monotonic() - t0, 2), *shape))


def attainment(sent: list[Sent], args: argparse.Namespace) -> float | None:
    ok = [r.error is None and r.ttft_s is not None and r.ttft_s <= args.ttft_s and (r.tpot_s or 0.0) <= args.tpot_s
          for r in sent]
    return round(sum(ok) / len(ok), 4) if ok else None


def switch_times(auto: Run, b_start: float) -> tuple[dict | None, float | None]:
    """The first change decided after phase B began, and when the deployment served with its new shape."""
    change = next((d for d in auto.decisions if d["action"] != "none" and d["t_s"] >= b_start), None)
    if change is None:
        return None, None
    want = tuple(int(x) for x in change["next_shape"].rstrip("D").split("P"))
    ready = next((t for t, n, m in auto.shapes if t >= change["t_s"] and (n, m) == want), None)
    return change, ready


def most_in_window(times: list[float], width_s: float) -> int:
    """The most changes that fall in any `width_s` window (flapping: more than one per cooldown)."""
    return max((sum(t <= u < t + width_s for u in times) for t in times), default=0)


def checks(static: Run, auto: Run) -> dict:
    """Lost, duplicated, mismatched: the static run is the fault-free reference of the same prompts."""
    out = {}
    for run in (static, auto):
        out[f"{run.name}_lost"] = sum(r.error is not None for r in run.sent)
        out[f"{run.name}_not_done"] = sum(r.state != "DONE" for r in run.sent)
        out[f"{run.name}_wrong_token_count"] = sum(r.tokens != r.output_len for r in run.sent)
        ids = [r.request_id for r in run.sent if r.request_id]
        out[f"{run.name}_duplicate_ids"] = len(ids) - len(set(ids))
    out["text_mismatches"] = sum(s.text != a.text for s, a in zip(static.sent, auto.sent, strict=True))
    return out


def summary(static: Run, auto: Run, args: argparse.Namespace) -> dict:
    b_start = args.phase_a_s
    change, ready = switch_times(auto, b_start)
    after = ready if ready is not None else b_start
    window = [i for i, r in enumerate(auto.sent) if r.phase == "B" and r.sent_s >= after]
    before_b = [i for i, r in enumerate(auto.sent) if r.phase == "B" and r.sent_s < after]

    def att(run: Run, idx: list[int]) -> float | None:
        return attainment([run.sent[i] for i in idx], args)

    rows = {
        "interval_s": args.interval_s, "window_s": args.window_s, "cooldown_s": args.cooldown_s,
        "slo": f"TTFT {args.ttft_s:g} s, TPOT {args.tpot_s:g} s, 90%",
        "load": f"A {args.phase_a_s:g} s at {args.rate_a:g} req/s (16 in/48 out); B {args.phase_b_s:g} s at "
                f"{args.rate_b:g} req/s ({args.prompt_b} in/2 out)",
        "requests": len(auto.sent), "phase_b_began_s": b_start,
        "decided_s": None if change is None else change["t_s"],
        "decision": None if change is None else f"{change['shape']} {change['action']} -> {change['next_shape']}",
        "decided_after_shift_intervals": None if change is None else round((change["t_s"] - b_start)
                                                                          / args.interval_s, 2),
        "serving_new_shape_s": ready, "changes": sum(d["action"] != "none" for d in auto.decisions),
        "most_changes_in_one_cooldown": most_in_window([d["t_s"] for d in auto.decisions if d["action"] != "none"],
                                                       args.cooldown_s),
        **checks(static, auto),
        "attainment_A_static": attainment([r for r in static.sent if r.phase == "A"], args),
        "attainment_A_autoscaled": attainment([r for r in auto.sent if r.phase == "A"], args),
        "attainment_B_before_switch_static": att(static, before_b),
        "attainment_B_before_switch_autoscaled": att(auto, before_b),
        "attainment_B_after_switch_static": att(static, window),
        "attainment_B_after_switch_autoscaled": att(auto, window),
        "requests_B_after_switch": len(window),
    }
    return rows


def print_report(rows: dict, auto: Run) -> None:
    print("\ndecisions (t: seconds after the load began):")
    for d in auto.decisions:
        obs = d["observed"]
        print(f"  t={d['t_s']:6.1f}  {d['shape']} {d['action']:<18} pred {_pct(d['predicted_before'])} -> "
              f"{_pct(d['predicted_after'])}  measured {_pct(obs.get('measured_attainment'))}  "
              f"{obs.get('arrival_rps')} req/s, in {obs.get('mean_input_len')}  {d['reason']}")
    print("serving shape:", ", ".join(f"t={t:g} {n}P{m}D" for t, n, m in auto.shapes))
    print("\n| measure | value |\n|---|---|")
    for k, v in rows.items():
        print(f"| {k} | {_pct(v)} |" if k.startswith("attainment") else f"| {k} | {v} |")


def _pct(v: object) -> str:
    return f"{v:.1%}" if isinstance(v, float) else str(v)


def over_time(run: Run, args: argparse.Namespace, end_s: float) -> list[tuple[float, float | None]]:
    """Attainment of the requests sent in each BIN_S (the plot's lower panel)."""
    bins = []
    t = 0.0
    while t < end_s:
        bins.append((t + BIN_S / 2, attainment([r for r in run.sent if t <= r.sent_s < t + BIN_S], args)))
        t += BIN_S
    return bins


def plot(static: Run, auto: Run, rows: dict, args: argparse.Namespace, path: Path) -> None:
    """Instances serving (autoscaled) and attainment per BIN_S (both runs) over the run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    end = args.phase_a_s + args.phase_b_s
    fig, (top, low) = plt.subplots(2, 1, sharex=True, figsize=(8, 5.5))
    times = [t for t, _, _ in auto.shapes] + [end]
    for col, label, style in ((1, "prefill", "-"), (2, "decode", "--")):
        values = [s[col] for s in auto.shapes]
        top.step(times, values + values[-1:], where="post", linestyle=style, label=f"{label} (autoscaled)")
    top.axhline(1, color="grey", linewidth=0.5)
    top.set_ylabel("instances serving")
    top.set_ylim(0, 3.5)
    for run, style in ((static, "s--"), (auto, "o-")):
        pts = [(t, a) for t, a in over_time(run, args, end) if a is not None]
        low.plot([t for t, _ in pts], [a for _, a in pts], style, label=run.name)
    low.axhline(0.9, color="grey", linewidth=0.5)
    low.set_ylabel(f"attainment per {BIN_S:g} s")
    low.set_xlabel("seconds since the load began")
    for ax in (top, low):
        ax.axvline(args.phase_a_s, color="k", linestyle=":", label="phase B begins")
        if rows["decided_s"] is not None:
            ax.axvline(rows["decided_s"], color="tab:red", linestyle=":", label="decision")
        if rows["serving_new_shape_s"] is not None:
            ax.axvline(rows["serving_new_shape_s"], color="tab:green", linestyle=":", label="new shape serving")
        ax.legend(fontsize=7, loc="lower left")
    top.set_title(f"autoscaler every {args.interval_s:g} s (window {args.window_s:g} s), 1P2D start, budget 3")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--interval-s", type=float, default=10.0)
    ap.add_argument("--window-s", type=float, default=10.0)
    ap.add_argument("--cooldown-s", type=float, default=20.0)
    ap.add_argument("--phase-a-s", type=float, default=60.0)
    ap.add_argument("--phase-b-s", type=float, default=90.0)
    ap.add_argument("--rate-a", type=float, default=4.0, help="phase A requests/s")
    ap.add_argument("--rate-b", type=float, default=6.0, help="phase B requests/s")
    ap.add_argument("--prompt-b", type=int, default=1000, help="phase B prompt tokens")
    ap.add_argument("--ttft-s", type=float, default=0.5)
    ap.add_argument("--tpot-s", type=float, default=0.1)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if not 16 <= args.prompt_b <= MAX_INPUT_LEN:
        ap.error(f"--prompt-b must be in [16, {MAX_INPUT_LEN}]")
    return args


def main() -> None:
    args = parse_args()
    from trt_disagg.engine_build.builder import build_deployment

    with tempfile.TemporaryDirectory(prefix="autoscale-bench-") as tmp_dir:
        tmp = Path(tmp_dir)
        cfg = make_config(tmp, args, None)
        build_deployment(load_deployment(cfg))
        profile = profile_engine_dir(load_deployment(cfg).engine_dir(Role.DECODE), tmp / "profile")
        cfg = make_config(tmp, args, profile)
        load = workload(args)
        print(f"load: phase A {args.phase_a_s:g} s at {args.rate_a:g} req/s (16 in / 48 out), phase B "
              f"{args.phase_b_s:g} s at {args.rate_b:g} req/s ({args.prompt_b} in / 2 out); {len(load)} requests; "
              f"SLO TTFT {args.ttft_s:g} s, TPOT {args.tpot_s:g} s", flush=True)
        print("static 1P2D ...", flush=True)
        static = one_run(cfg, "static", load, autoscale=False)
        print(f"autoscaled (every {args.interval_s:g} s, window {args.window_s:g} s) ...", flush=True)
        auto = one_run(cfg, "autoscaled", load, autoscale=True)
        rows = summary(static, auto, args)
        print_report(rows, auto)
        profile_json = json.loads(profile.read_text())
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"summary": rows, "decisions": auto.decisions, "shapes": auto.shapes,
                                        "latency_model": profile_json["latency_model"],
                                        "static": [asdict(r) for r in static.sent],
                                        "autoscaled": [asdict(r) for r in auto.sent]}, indent=1))
        png = args.out.with_suffix(".png")
        plot(static, auto, rows, args, png)
        print(f"wrote {args.out} and {png}")


if __name__ == "__main__":
    main()
