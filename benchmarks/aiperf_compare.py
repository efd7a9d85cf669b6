"""`trt-disagg bench` against NVIDIA's aiperf: the same deployment, rate, temperature and lengths, one after
the other, and their TTFT and ITL side by side.

    .venv/bin/python benchmarks/aiperf_compare.py --url http://127.0.0.1:8000 --config configs/tiny.yaml \
        [--aiperf /tmp/aiperf-venv/bin/aiperf] [--rate 2] [--num-requests 100] [--out runs/aiperf_compare]

aiperf needs numpy 2 and our virtualenv pins numpy < 2 (pytriton), so aiperf lives in a virtualenv of its
own; without it at --aiperf the script says so and exits 0. Both tools send streamed /v1/completions with
prompts of --input-len tokens counted by the engine's tokenizer, --output-len tokens (ignore_eos) and
Poisson arrivals; aiperf reads the token counts from the server's usage (`--use-server-token-count`).

The two define ITL differently, so each aiperf figure is set beside the bench figure defined the same way:

    aiperf "Time to First Token"     first content chunk − request sent       ↔ bench ttft_s
    aiperf "Inter Token Latency"     per request (e2e − TTFT) / (tokens − 1)  ↔ bench tpot_s (DistServe's TPOT)
                                     (bench itl_s is every gap between two token chunks, pooled: shown too)
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from the repository

from trt_disagg.config import load_deployment  # noqa: E402
from trt_disagg.contract import Role  # noqa: E402
from trt_disagg.engine_dir import TOKENIZER_DIR  # noqa: E402

AGREE_WITHIN = 0.10  # the comparison passes when every paired figure is within 10%
STATS = ("mean", "p50", "p90")


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
    p.add_argument("--out", type=Path, default=REPO / "runs" / "aiperf_compare")
    return p.parse_args(argv)


def run_bench(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """One `trt-disagg bench` run; its summary's run (ttft_s, tpot_s, itl_s percentiles, in seconds)."""
    cli = Path(sys.executable).parent / "trt-disagg"
    subprocess.run([str(cli), "bench", "--url", args.url, "--config", str(args.config), "--dataset", "fixed",
                    "--input-len", str(args.input_len), "--output-len", str(args.output_len),
                    "--rates", str(args.rate), "--num-requests", str(args.num_requests),
                    "--temperature", str(args.temperature), "--out", str(out)], check=True)
    doc = json.loads((out / "summary.json").read_text())
    (series,) = doc["series"].values()
    return dict(series["runs"][0])


def run_aiperf(args: argparse.Namespace, model: str, tokenizer: Path, out: Path) -> dict[str, Any]:
    """One aiperf profile run; its summary JSON (metrics in ms)."""
    extra = json.dumps({"ignore_eos": True, "temperature": args.temperature})
    subprocess.run([str(args.aiperf), "profile", "--model", model, "--url", args.url,
                    "--endpoint-type", "completions", "--streaming", "--tokenizer", str(tokenizer),
                    "--use-server-token-count", "--synthetic-input-tokens-mean", str(args.input_len),
                    "--synthetic-input-tokens-stddev", "0", "--output-tokens-mean", str(args.output_len),
                    "--output-tokens-stddev", "0", "--extra-inputs", extra, "--request-rate", str(args.rate),
                    "--arrival-pattern", "poisson", "--request-count", str(args.num_requests),
                    "--random-seed", "0", "--artifact-dir", str(out)], check=True)
    found = sorted(out.rglob("profile_export_aiperf.json"))
    if not found:
        raise SystemExit(f"aiperf wrote no profile_export_aiperf.json under {out}")
    return dict(json.loads(found[-1].read_text()))


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
    aiperf = run_aiperf(args, dep.name, tokenizer, args.out / "aiperf")
    rows = pairs(bench, aiperf)
    print(f"{'figure':52} {'bench ms':>10} {'aiperf ms':>10} {'diff':>7}")
    for r in rows:
        a = "" if r["aiperf_ms"] is None else f"{r['aiperf_ms']:10.1f}"
        d = "" if r["difference"] is None else f"{r['difference']:+7.1%}"
        print(f"{r['figure']:52} {r['bench_ms']:10.1f} {a:>10} {d:>7}")
    paired = [r for r in rows if r["difference"] is not None]
    agree = all(abs(r["difference"]) <= AGREE_WITHIN for r in paired)
    (args.out / "compare.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                       "rows": rows, "agree_within_10pct": agree}, indent=2))
    print(f"agree within {AGREE_WITHIN:.0%}: {agree}")
    return 0 if agree else 1


if __name__ == "__main__":
    raise SystemExit(main())
