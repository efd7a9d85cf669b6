"""`trt-disagg bench` against NVIDIA's aiperf on the same load: the schedule and prompts the bench sent,
replayed by aiperf, so what differs between their TTFT and ITL is the two clients' own cost.

    .venv/bin/python benchmarks/aiperf_compare.py --url http://127.0.0.1:8000 --config configs/tiny.yaml \
        [--aiperf /tmp/aiperf-venv/bin/aiperf] [--rate 2] [--num-requests 100] [--seed 0] \
        [--out runs/aiperf_compare]

aiperf needs numpy 2 and our virtualenv pins numpy < 2 (pytriton), so aiperf lives in a virtualenv of its
own; without it at --aiperf the script says so and exits 0.

    trt-disagg bench (fixed prompts of --input-len tokens, Poisson arrivals at --rate, --seed)
        │  requests.csv: scheduled_s of every request; bench_config.json: how its prompts were drawn
        ▼
    aiperf_schedule.jsonl   one line per bench request: timestamp (ms after the start, the bench's
        │                   scheduled_s), text (the prompt's token ids decoded by the deployment's
        │                   tokenizer), output_length (max_tokens), extra (ignore_eos, min_tokens, temperature)
        ▼
    aiperf profile --custom-dataset-type single_turn --input-file aiperf_schedule.jsonl --fixed-schedule

Each Poisson draw of 100 requests has its own realized rate and bursts, and queueing follows them, so two
tools drawing their own arrivals measure different loads; replaying one schedule removes that. aiperf's
server-metrics scraping, GPU telemetry and dashboard are turned off: they share the client's cores.
Printed beside the table, per tool: realized rate (requests − 1 over first to last send), peak requests
in flight, how late sends were against the schedule (relative to the earliest, so aiperf's start-up does
not count) and the prompt tokens the server counted (bench `server_input_len`, aiperf `usage_prompt_tokens`).

The two define ITL differently, so each aiperf figure is set beside the bench figure defined the same way:

    aiperf "Time to First Token"     first content chunk − request sent       ↔ bench ttft_s
    aiperf "Inter Token Latency"     per request (e2e − TTFT) / (tokens − 1)  ↔ bench tpot_s (DistServe's TPOT)
                                     (bench itl_s is every gap between two token chunks, pooled: shown too)
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from the repository

from trt_disagg.config import load_deployment  # noqa: E402
from trt_disagg.contract import Role  # noqa: E402
from trt_disagg.engine_dir import TOKENIZER_DIR  # noqa: E402

AGREE_WITHIN = 0.10  # the comparison passes when every paired figure is within 10%
STATS = ("mean", "p50", "p90")
SCHEDULE_FILE = "aiperf_schedule.jsonl"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", required=True, help="the router of a running deployment")
    p.add_argument("--config", type=Path, required=True, help="its deployment YAML (model name, tokenizer)")
    p.add_argument("--aiperf", type=Path, default=Path("/tmp/aiperf-venv/bin/aiperf"))
    p.add_argument("--rate", type=float, default=2.0)
    p.add_argument("--num-requests", type=int, default=100)
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="the bench's seed: arrivals and prompts")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "aiperf_compare")
    return p.parse_args(argv)


def run_bench(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """One `trt-disagg bench` run; its summary's run (ttft_s, tpot_s, itl_s percentiles, in seconds)."""
    cli = Path(sys.executable).parent / "trt-disagg"
    subprocess.run([str(cli), "bench", "--url", args.url, "--config", str(args.config), "--dataset", "fixed",
                    "--input-len", str(args.input_len), "--output-len", str(args.output_len),
                    "--rates", str(args.rate), "--num-requests", str(args.num_requests), "--seed", str(args.seed),
                    "--temperature", str(args.temperature), "--no-progress", "--out", str(out)], check=True)
    doc = json.loads((out / "summary.json").read_text())
    (series,) = doc["series"].values()
    return dict(series["runs"][0])


def bench_records(out: Path) -> list[dict[str, str]]:
    """The bench run's per-request rows (requests.csv), in send order."""
    with (out / "requests.csv").open(newline="") as f:
        return sorted(csv.DictReader(f), key=lambda r: int(r["index"]))


def write_schedule(bench_out: Path, rows: list[dict[str, str]], path: Path) -> None:
    """The bench's load as an aiperf single_turn dataset: each request's send time and prompt.

    The prompts are drawn again the way the bench drew them (`load_workload` with the settings it saved in
    bench_config.json, same seed and tokenizer): request i of requests.csv is workload item i.
    """
    from trt_disagg.commands.bench import load_tokenizer
    from trt_disagg.workload import load_workload

    s = json.loads((bench_out / "bench_config.json").read_text())
    requests = load_workload(s["dataset"], num_requests=s["num_requests"], seed=s["seed"],
                             tokenizer=load_tokenizer(Path(s["tokenizer"])), max_input_len=s["max_input_len"],
                             max_output_len=s["max_output_len"], max_seq_len=s["max_seq_len"],
                             input_len=s["input_len"], output_len=s["output_len"])
    with path.open("w") as f:
        for row in rows:
            req = requests[int(row["index"])]
            if req.prompt is None or req.prompt_ids is None or len(req.prompt_ids) != int(row["input_len"]):
                raise SystemExit(f"request {row['index']}: the redrawn prompt does not match the bench's")
            extra = {"ignore_eos": True, "min_tokens": req.output_len, "temperature": s["temperature"]}
            f.write(json.dumps({"timestamp": float(row["scheduled_s"]) * 1e3, "text": req.prompt,
                                "output_length": req.output_len, "extra": extra}) + "\n")


def run_aiperf(args: argparse.Namespace, model: str, tokenizer: Path, schedule: Path,
               out: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """aiperf replaying `schedule`; its summary (metrics in ms) and its per-request records."""
    shutil.rmtree(out, ignore_errors=True)  # a stale export must never be read as this run's
    subprocess.run([str(args.aiperf), "profile", "--model", model, "--url", args.url,
                    "--endpoint-type", "completions", "--streaming", "--tokenizer", str(tokenizer),
                    "--use-server-token-count", "--custom-dataset-type", "single_turn",
                    "--input-file", str(schedule), "--fixed-schedule", "--random-seed", str(args.seed),
                    "--no-server-metrics", "--no-gpu-telemetry", "--ui-type", "none",
                    "--artifact-dir", str(out)], check=True)
    found = sorted(out.rglob("profile_export_aiperf.json"))
    records = sorted(out.rglob("profile_export.jsonl"))
    if not found or not records:
        raise SystemExit(f"aiperf wrote no profile_export_aiperf.json / profile_export.jsonl under {out}")
    lines = records[-1].read_text().splitlines()
    return dict(json.loads(found[-1].read_text())), [json.loads(line) for line in lines if line.strip()]


def load_of(starts: list[float], ends: list[float], scheduled: list[float], prompt_tokens: list[int]) -> dict[str, Any]:
    """What one tool's run put on the server: realized rate, peak in flight, send lag, prompt tokens.

    Send lag is each send's offset from its scheduled time, less the smallest offset (the two tools' clocks
    start at different moments); sends and schedule are paired in time order.
    """
    s, e = np.asarray(starts), np.asarray(ends)
    events = sorted([(t, 1) for t in s] + [(t, -1) for t in e], key=lambda x: (x[0], x[1]))
    depth = peak = 0
    for _, step in events:
        depth += step
        peak = max(peak, depth)
    lag = np.sort(s) - np.sort(np.asarray(scheduled))
    lag -= lag.min()
    span = float(s.max() - s.min())
    return {"requests": len(s), "realized_rps": (len(s) - 1) / span if span > 0 else float("nan"),
            "peak_in_flight": peak, "send_lag_p50_ms": float(np.percentile(lag, 50)) * 1e3,
            "send_lag_max_ms": float(lag.max()) * 1e3, "prompt_tokens": sorted(set(prompt_tokens))}


def bench_load(rows: list[dict[str, str]]) -> dict[str, Any]:
    ok = [r for r in rows if not r["error"]]
    return load_of([float(r["sent_s"]) for r in ok], [float(r["sent_s"]) + float(r["e2e_s"]) for r in ok],
                   [float(r["scheduled_s"]) for r in ok],
                   [int(r["server_input_len"]) for r in ok if r["server_input_len"]])


def aiperf_load(records: list[dict[str, Any]], scheduled: list[float]) -> dict[str, Any]:
    meta = [r["metadata"] for r in records]
    tokens = [int(r["metrics"]["usage_prompt_tokens"]["value"]) for r in records
              if "usage_prompt_tokens" in r.get("metrics", {})]
    return load_of([m["request_start_ns"] / 1e9 for m in meta], [m["request_end_ns"] / 1e9 for m in meta],
                   scheduled[: len(meta)], tokens)


def pairs(bench: dict[str, Any], aiperf: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows (figure, bench ms, aiperf ms, difference) of the figures defined the same way."""
    rows = []
    for ours, theirs in (("ttft_s", "time_to_first_token"), ("tpot_s", "inter_token_latency")):
        for stat in STATS:
            b = float(bench[ours][stat]) * 1e3
            a = float(aiperf[theirs]["avg" if stat == "mean" else stat])
            rows.append({"figure": f"{ours} {stat} ↔ {theirs}", "bench_ms": b, "aiperf_ms": a,
                         "difference": (b - a) / a if a else float("nan")})
    for stat in STATS:  # shown, not paired: aiperf has no per-gap ITL
        rows.append({"figure": f"itl_s {stat} (every gap)", "bench_ms": float(bench["itl_s"][stat]) * 1e3,
                     "aiperf_ms": None, "difference": None})
    return rows


def per_request_differences(rows_csv: list[dict[str, str]], records: list[dict[str, Any]]) -> dict[str, Any]:
    """Request i of the bench against request i of aiperf (both in send order, the same scheduled moment and
    prompt): the median of the per-request differences over the median figure. Queueing noise that two runs
    of one schedule do not share still moves single requests, but not the median difference much; it is
    the closest look at the two clients' own cost that two runs one after the other allow."""
    bench = [r for r in rows_csv if not r["error"]]
    aiperf = sorted(records, key=lambda r: r["metadata"]["request_start_ns"])
    out: dict[str, Any] = {"pairs": min(len(bench), len(aiperf))}
    for ours, theirs in (("ttft_s", "time_to_first_token"), ("tpot_s", "inter_token_latency")):
        b = np.array([float(r[ours]) * 1e3 for r in bench[: out["pairs"]]])
        a = np.array([float(r["metrics"][theirs]["value"]) if theirs in r.get("metrics", {}) else np.nan
                      for r in aiperf[: out["pairs"]]])
        ok = ~np.isnan(a)
        diff = float(np.median(b[ok] - a[ok])) if ok.any() else float("nan")
        out[ours] = {"median_difference_ms": diff, "relative": diff / float(np.median(a[ok])) if ok.any() else None}
    return out


def print_table(rows: list[dict[str, Any]], loads: dict[str, dict[str, Any]]) -> None:
    print(f"{'figure':52} {'bench ms':>10} {'aiperf ms':>10} {'diff':>7}")
    for r in rows:
        a = "" if r["aiperf_ms"] is None else f"{r['aiperf_ms']:10.1f}"
        d = "" if r["difference"] is None else f"{r['difference']:+7.1%}"
        print(f"{r['figure']:52} {r['bench_ms']:10.1f} {a:>10} {d:>7}")
    print("load each tool put on the server (same schedule):")
    for tool, ld in loads.items():
        print(f"  {tool:7} {ld['requests']} requests, realized {ld['realized_rps']:.3f} req/s, "
              f"peak in flight {ld['peak_in_flight']}, send lag p50 {ld['send_lag_p50_ms']:.1f} ms / "
              f"max {ld['send_lag_max_ms']:.1f} ms, server prompt tokens {ld['prompt_tokens']}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.aiperf.is_file() and shutil.which(str(args.aiperf)) is None:
        print(f"aiperf is not installed at {args.aiperf}: comparison skipped "
              "(python -m venv /tmp/aiperf-venv && /tmp/aiperf-venv/bin/pip install aiperf)")
        return 0
    dep = load_deployment(args.config)
    role = Role.PREFILL if dep.context_servers is not None else Role.COLOCATED
    tokenizer = dep.engine_dir(role) / TOKENIZER_DIR
    bench = run_bench(args, args.out / "bench")
    rows_csv = bench_records(args.out / "bench")
    schedule = args.out / SCHEDULE_FILE
    write_schedule(args.out / "bench", rows_csv, schedule)
    aiperf, records = run_aiperf(args, dep.name, tokenizer, schedule, args.out / "aiperf")
    loads = {"bench": bench_load(rows_csv),
             "aiperf": aiperf_load(records, [float(r["scheduled_s"]) for r in rows_csv])}
    rows = pairs(bench, aiperf)
    print_table(rows, loads)
    per_request = per_request_differences(rows_csv, records)
    for name in ("ttft_s", "tpot_s"):
        d = per_request[name]
        print(f"per request ({per_request['pairs']} pairs), bench - aiperf: {name} median "
              f"{d['median_difference_ms']:+.1f} ms ({d['relative']:+.1%} of aiperf's median)")
    paired = [r for r in rows if r["difference"] is not None]
    agree = all(abs(r["difference"]) <= AGREE_WITHIN for r in paired)
    (args.out / "compare.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                       "rows": rows, "load": loads, "per_request": per_request,
                                                       "agree_within_10pct": agree}, indent=2))
    print(f"agree within {AGREE_WITHIN:.0%}: {agree}")
    return 0 if agree else 1


if __name__ == "__main__":
    raise SystemExit(main())
