"""`trt-disagg serve` supervising a deployment (tiny engines: prefill TP2, two decode PP2, colocated, the
router, the embedded Valkey) while its processes are killed, as an operations team would:

(0) no process of the deployment (router, Valkey, instances, their stubs and ranks) listens on a wildcard
    address (nothing is configured to);
(1) a decode instance's tritonserver killed: serve restarts it and it registers again, while the router
    keeps answering;
(2) a TP rank of the prefill instance killed: the instance deregisters and its tritonserver exits by itself;
    serve restarts it, it registers again and the deployment answers;
(3) the embedded Valkey killed: serve restarts it, empty, on the same port; the instances re-register and
    the router answers again, with nothing else restarted;
(4) the router killed: serve restarts it on the same port and it answers again;
(5) SIGTERM: exit code 0, and no process, shared memory or temporary file of the deployment left.
The tests share one deployment and run in this order; (5) ends it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from tests.faults.helpers import (
    TINY_CONFIG,
    WILDCARDS,
    cmdline,
    descendants,
    listeners,
    live_pids,
    pids_mentioning,
    ppid,
    rank_pids,
    registered,
    shm_left,
    shm_prefixes,
    state,
    temp_entries,
    wait_for,
)
from trt_disagg.contract import Role
from trt_disagg.triton.launch import free_port

pytestmark = pytest.mark.slow

CLI = str(Path(sys.executable).parent / "trt-disagg")
RECOVER_S = 60.0  # deadline of each poll for a restart (the tiny instances load in a few seconds)


@dataclass
class Serving:
    proc: subprocess.Popen
    run_dir: Path
    redis_url: str
    router_url: str
    stderr_path: Path
    temp_before: set[str]  # the system temporary directory's entries of ours before serve started

    def server_pid(self, instance_id: str) -> int | None:
        """The pid of the tritonserver serving `instance_id` now (None between a death and its restart)."""
        repo = f"--model-repository={self.run_dir}/repos/{instance_id} "
        found = [pid for pid in pids_mentioning(repo) if cmdline(pid).split(" ", 1)[0].endswith("tritonserver")]
        return found[0] if found else None

    def answers(self) -> bool:
        body = {"model": "tiny", "prompt": "Hello there", "max_tokens": 4, "temperature": 0}
        try:
            r = httpx.post(f"{self.router_url}/v1/completions", json=body, timeout=30)
        except httpx.HTTPError:
            return False
        return r.status_code == 200 and bool(r.json()["choices"][0]["text"])

    def log(self) -> str:
        return self.stderr_path.read_text(errors="replace")


def _config(tmp_path: Path, engines_root: Path) -> Path:
    data = yaml.safe_load(TINY_CONFIG.read_text())
    data["generation_servers"]["num_instances"] = 2
    data["engines_dir"] = str(engines_root)  # read by the instances and the router (its tokenizer)
    data["router"]["port"] = free_port()
    path = tmp_path / "tiny-2d.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def serving(tiny_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Serving]:
    tmp = tmp_path_factory.mktemp("serve-faults")
    run_dir, stderr_path = tmp / "run", tmp / "serve.stderr"
    env = {**os.environ, "COLUMNS": "400"}
    env.pop("REDIS_URL", None)
    temp_before = temp_entries()
    with open(stderr_path, "w") as errf:
        proc = subprocess.Popen([CLI, "serve", str(_config(tmp, tiny_root)), "--run-dir", str(run_dir)],
                                stdout=subprocess.PIPE, stderr=errf, text=True, env=env, start_new_session=True)
    try:
        lines = []
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("ready in"):
                break
        text = "".join(lines)
        assert "ready in" in text, text + stderr_path.read_text()
        redis_url = next(ln.split()[1] for ln in lines if ln.startswith("Redis:"))
        router_url = next(ln.split()[1] for ln in lines if ln.startswith("Router:"))
        yield Serving(proc, run_dir, redis_url, router_url, stderr_path, temp_before)
    finally:  # after a failed test: a graceful stop first (it removes shm and temp dirs), then kill
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                for pid in pids_mentioning(str(run_dir)):
                    os.kill(pid, signal.SIGKILL)
                proc.wait()


def test_nothing_of_the_deployment_listens_on_a_wildcard_address(serving: Serving) -> None:
    pids = descendants(serving.proc.pid)  # the router, Valkey, every tritonserver, stub and rank
    assert all(serving.server_pid(i) in pids for i in ("prefill-0", "decode-0", "decode-1", "colocated-0"))
    found = listeners(pids)
    router_port = int(serving.router_url.rsplit(":", 1)[1])
    valkey_port = int(serving.redis_url.rsplit(":", 1)[1])
    assert {router_port, valkey_port} <= {port for _, _, port in found}  # the check sees them
    wild = [(pid, addr, port) for pid, addr, port in found if addr in WILDCARDS]
    assert not wild, f"listening on every interface (pid, address, port): {wild}"


def test_killed_instance_is_restarted_and_registers_again(serving: Serving) -> None:
    assert serving.answers()
    assert registered(serving.redis_url, Role.DECODE) == {"decode-0", "decode-1"}
    old = serving.server_pid("decode-1")
    assert old is not None
    prefixes = shm_prefixes(old)
    assert len(prefixes) == 2 and shm_left(prefixes)  # its Triton regions exist (KV segments come and go)
    t0 = time.monotonic()
    os.kill(old, signal.SIGKILL)  # the server only: its stub sees it die and deregisters the instance
    gone_s = wait_for(lambda: "decode-1" not in registered(serving.redis_url, Role.DECODE), 10,
                      "the killed instance leaves the registry")
    num_answered = 0
    while "decode-1" not in registered(serving.redis_url, Role.DECODE):
        assert serving.answers(), "the deployment stopped answering while decode-1 was down"
        num_answered += 1
        assert time.monotonic() - t0 < RECOVER_S, "decode-1 did not register again"
    back_s = time.monotonic() - t0
    new = serving.server_pid("decode-1")
    assert new is not None and new != old
    assert not shm_left(prefixes)  # the killed server's regions were removed before the restart
    assert "decode-1 is down (killed by SIGKILL)" in serving.log() and "restarted decode-1" in serving.log()
    assert serving.answers()
    print(f"decode-1 killed: out of the registry after {gone_s:.2f}s, registered again after {back_s:.1f}s; "
          f"{num_answered} requests answered meanwhile")


def test_killed_rank_makes_the_instance_leave_and_come_back(serving: Serving) -> None:
    old = serving.server_pid("prefill-0")
    assert old is not None
    ranks = rank_pids(old)
    assert len(ranks) == 2, ranks  # TP2
    t0 = time.monotonic()
    os.kill(ranks[-1], signal.SIGKILL)
    gone_s = wait_for(lambda: "prefill-0" not in registered(serving.redis_url, Role.PREFILL), 10,
                      "the instance with a dead rank deregisters")
    exit_s = wait_for(lambda: old not in live_pids() or state(old) == "Z", 10,
                      "its tritonserver exits by itself")
    back_s = wait_for(lambda: "prefill-0" in registered(serving.redis_url, Role.PREFILL), RECOVER_S,
                      "serve restarts it and it registers again")
    new = serving.server_pid("prefill-0")
    assert new is not None and new != old and len(rank_pids(new)) == 2
    assert "prefill-0 is down (exit code 0: engine failed (rank process died: rank " in serving.log()
    assert wait_for(serving.answers, 30, "the deployment answers") >= 0
    print(f"rank killed: deregistered after {gone_s:.2f}s, server exited after {gone_s + exit_s:.2f}s, "
          f"registered again after {time.monotonic() - t0:.1f}s (back_s {back_s:.1f})")


def test_killed_valkey_is_restarted_and_repopulated(serving: Serving) -> None:
    (valkey,) = [pid for pid in live_pids() if ppid(pid) == serving.proc.pid and "valkey" in cmdline(pid)]
    servers = {i: serving.server_pid(i) for i in ("prefill-0", "decode-0", "decode-1", "colocated-0")}
    t0 = time.monotonic()
    os.kill(valkey, signal.SIGKILL)
    wait_for(lambda: registered(serving.redis_url, Role.DECODE) == {"decode-0", "decode-1"}
             and registered(serving.redis_url, Role.PREFILL) == {"prefill-0"}, 15,
             "the instances re-register in the restarted Valkey")
    registry_s = time.monotonic() - t0
    answer_s = wait_for(serving.answers, 15, "the router answers again") + registry_s
    assert {i: serving.server_pid(i) for i in servers} == servers  # no instance was restarted
    assert "redis is down" in serving.log() and "restarted redis" in serving.log()
    print(f"Valkey killed: registry repopulated after {registry_s:.2f}s, router answering after {answer_s:.2f}s")


def test_killed_router_is_restarted_on_its_port(serving: Serving) -> None:
    (router,) = [pid for pid in live_pids() if ppid(pid) == serving.proc.pid and "-m router" in cmdline(pid)]
    t0 = time.monotonic()
    os.kill(router, signal.SIGKILL)
    back_s = wait_for(serving.answers, RECOVER_S, "the restarted router answers on the same URL")
    assert "router is down (killed by SIGKILL)" in serving.log() and "restarted router" in serving.log()
    print(f"router killed: answering again after {time.monotonic() - t0:.1f}s (polled {back_s:.1f}s)")


def test_sigterm_stops_everything(serving: Serving) -> None:
    servers = [serving.server_pid(i) for i in ("prefill-0", "decode-0", "decode-1", "colocated-0")]
    prefixes = tuple(p for pid in servers if pid is not None for p in shm_prefixes(pid))
    assert len(prefixes) == 8
    t0 = time.monotonic()
    serving.proc.send_signal(signal.SIGTERM)
    assert serving.proc.wait(timeout=60) == 0, serving.log()
    print(f"serve stopped in {time.monotonic() - t0:.1f}s")
    assert not pids_mentioning(str(serving.run_dir))  # every tritonserver, stub and rank process
    assert not [pid for pid in live_pids() if ppid(pid) == serving.proc.pid]
    assert not shm_left(prefixes)
    # nor temporary files, those of the instance and the rank process killed on the way included
    assert not temp_entries() - serving.temp_before
