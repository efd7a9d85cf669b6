"""How much does the load generator itself add to what it measures?

Starts the fake OpenAI server (trt_disagg.bench.fake_openai) in its own process with a known time to first
token and time per output token, drives it with `run_at_rate` at several rates, and prints per rate:

- send lag     : actual send − scheduled arrival (the open-loop client falling behind), p50 / p99
- TTFT error   : measured TTFT − the server's delay, p50 / p99
- TPOT error   : measured TPOT − the server's delay per token, p50 / p99

Everything here is client + fake server overhead; on the real deployment it adds to the router's and the
engines' latencies. Run: `.venv/bin/python benchmarks/loadgen_accuracy.py [--rates 10,50,100]`.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys

import numpy as np

from trt_disagg.bench.loadgen import run_at_rate
from trt_disagg.bench.metrics import tpot_s, ttft_s
from trt_disagg.config import SLO
from trt_disagg.workload import WorkloadRequest, make_arrivals


def ms(values: list[float], q: float) -> str:
    return f"{1000 * float(np.percentile(values, q)):7.2f}" if values else "      -"


async def measure(url: str, rates: list[float], num_requests: int, output_len: int, ttft: float,
                  tpot: float) -> None:
    slo = SLO(ttft_s=60.0, tpot_s=60.0)
    requests = [WorkloadRequest(prompt=f"request {i}", prompt_ids=None, input_len=4, output_len=output_len)
                for i in range(num_requests)]
    print(f"fake server: TTFT {1000 * ttft:g} ms, TPOT {1000 * tpot:g} ms; {num_requests} requests x "
          f"{output_len} tokens per rate")
    print(f"{'rate/s':>7} {'failed':>6} | {'lag p50':>7} {'lag p99':>7} | {'TTFT+ p50':>9} {'TTFT+ p99':>9} | "
          f"{'TPOT+ p50':>9} {'TPOT+ p99':>9}   (ms)")
    for rate in rates:
        arrivals = make_arrivals("poisson", rate, num_requests, seed=0)
        run = await run_at_rate(url, "fake-model", requests, arrivals, slo, rate_rps=rate)
        ok = [r for r in run.records if r.ok]
        lag = [r.sent_s - r.scheduled_s for r in run.records]
        ttft_err = [v - ttft for v in (ttft_s(r) for r in ok) if v is not None]
        tpot_err = [v - tpot for v in (tpot_s(r) for r in ok) if v is not None]
        print(f"{rate:7.3g} {len(run.records) - len(ok):6d} | {ms(lag, 50)} {ms(lag, 99)} | "
              f"{ms(ttft_err, 50):>9} {ms(ttft_err, 99):>9} | {ms(tpot_err, 50):>9} {ms(tpot_err, 99):>9}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rates", default="10,50,100")
    parser.add_argument("--num-requests", type=int, default=200)
    parser.add_argument("--output-len", type=int, default=16)
    parser.add_argument("--ttft", type=float, default=0.05)
    parser.add_argument("--tpot", type=float, default=0.01)
    args = parser.parse_args()
    rates = [float(r) for r in args.rates.split(",")]
    server = subprocess.Popen([sys.executable, "-m", "trt_disagg.bench.fake_openai", str(args.ttft),
                               str(args.tpot)], stdout=subprocess.PIPE, text=True)
    try:
        url = server.stdout.readline().strip() if server.stdout else ""  # printed once the socket listens
        if not url.startswith("http://"):
            raise SystemExit(f"fake server did not start (got {url!r})")
        asyncio.run(measure(url, rates, args.num_requests, args.output_len, args.ttft, args.tpot))
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
