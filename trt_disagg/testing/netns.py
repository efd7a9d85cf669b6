"""Test hosts on one machine: Linux network namespaces on a private bridge, links shaped with tc.

    switch namespace <lab>-sw:  bridge br0 ── veth ── host namespace <lab>-h1: eth0 10.<net>.<k>.1/24, lo
                                          ├── veth ── host namespace <lab>-h2: eth0 10.<net>.<k>.2/24, lo
                                          └── ...

Nothing is added to the machine's own network namespace: the bridge lives in a namespace of its own, so
only addresses inside the lab (and each namespace's 127.0.0.1) can ever be reached. Processes start in a
host with `spawn` the way a user starts them on a real host; each also gets its own UTS namespace and
hostname, so `local_host_id()` tells hosts apart (shm is then refused across them, as on real hosts). Code
in the test process reaches a host with `call(host, fn)`: `fn` runs in a thread that has joined the host's
network namespace (setns), so every socket it opens is inside the lab.

`shape(host, rate_mbit=..., delay_ms=..., loss_pct=...)` puts netem (delay, loss) and tbf (rate) on both
directions of the host's link; on a kernel without netem the host's link becomes two TAP devices joined by a
delay line in this process (`delay_line.py`) with tbf on both, which behaves the same. `cut(host)` takes the link down; `delete(host)` removes the namespace (its
link goes with it; processes in it stay, cut off, until `close`). `close()` kills every process started here,
removes every namespace (which removes veths, the bridge and qdiscs with them) and is safe after any failure.
Needs root (CAP_SYS_ADMIN, CAP_NET_ADMIN); `unavailable_reason()` says why a lab cannot be made here.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from trt_disagg.testing.delay_line import DelayLine, open_tap
from trt_disagg.triton.launch import python_env_dirs, remove_empty_dirs, stop_process

log = logging.getLogger(__name__)

T = TypeVar("T")
CLONE_NEWNET = 0x40000000
LAB_PREFIX = "trtdlab"


def unavailable_reason() -> str | None:
    """Why network-namespace test hosts cannot be made here; None when they can."""
    if os.geteuid() != 0:
        return "network-namespace test hosts need root (CAP_NET_ADMIN, CAP_SYS_ADMIN)"
    for tool in ("ip", "tc", "unshare"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed"
    probe = f"{LAB_PREFIX}probe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _run(*cmd: str) -> None:
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {res.stderr.strip()}")


def remove_stale_labs() -> None:
    """Namespaces of labs whose test process died without cleaning up (a killed pytest)."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    for line in out.splitlines():
        name = line.split()[0] if line.strip() else ""
        parts = name.split("-")
        if not name.startswith(LAB_PREFIX) or len(parts) < 2 or not parts[0][len(LAB_PREFIX):].isdigit():
            continue
        if not Path(f"/proc/{parts[0][len(LAB_PREFIX):]}").exists():
            _kill_netns_pids(name)
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


def _kill_netns_pids(ns: str) -> None:
    pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


@dataclass(frozen=True)
class Host:
    name: str  # "h1"
    netns: str  # the namespace
    address: str  # its address on the lab network


class NetnsLab:
    """`num_hosts` hosts on one bridge; a context manager (`close` on exit, whatever happened)."""

    def __init__(self, num_hosts: int) -> None:
        pid = os.getpid()
        self.prefix = f"{LAB_PREFIX}{pid}"
        self.subnet = f"10.{200 + pid % 50}.{pid // 50 % 250}"
        self.hosts = {f"h{i}": Host(f"h{i}", f"{self.prefix}-h{i}", f"{self.subnet}.{i}")
                      for i in range(1, num_hosts + 1)}
        self.switch = f"{self.prefix}-sw"
        self._made: list[str] = []
        self._procs: list[subprocess.Popen] = []
        self._delay_lines: dict[str, DelayLine] = {}  # host -> its link, where netem is missing
        # each host's TMPDIR, as a host has its own /tmp: what its killed processes leave is removed with it
        self._tmp_root = Path(tempfile.mkdtemp(prefix=f"{self.prefix}-tmp-"))
        # Triton's Python backend ignores TMPDIR; a server killed with its host leaves an empty one of these
        self._python_envs_before = python_env_dirs()

    def __enter__(self) -> NetnsLab:
        try:
            self.up()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def up(self) -> None:
        remove_stale_labs()
        self._add_netns(self.switch)
        sw = ["ip", "-n", self.switch]
        _run(*sw, "link", "add", "br0", "type", "bridge")
        _run(*sw, "link", "set", "br0", "up")
        for i, host in enumerate(self.hosts.values(), start=1):
            self._add_netns(host.netns)
            port = f"p{i}"
            _run("ip", "-n", self.switch, "link", "add", port, "type", "veth", "peer", "name", "eth0",
                 "netns", host.netns)
            _run(*sw, "link", "set", port, "master", "br0", "up")
            hn = ["ip", "-n", host.netns]
            _run(*hn, "addr", "add", f"{host.address}/24", "dev", "eth0")
            _run(*hn, "link", "set", "eth0", "up")
            _run(*hn, "link", "set", "lo", "up")

    def _add_netns(self, name: str) -> None:
        _run("ip", "netns", "add", name)
        self._made.append(name)

    def _switch_port(self, host: str) -> str:
        return f"p{list(self.hosts).index(host) + 1}"

    # ---- processes and calls in a host ----
    def spawn(self, host: str, cmd: list[str], env: dict[str, str] | None = None,
              log_path: Path | None = None) -> subprocess.Popen:
        """Start `cmd` on `host` (its own network and UTS namespace, hostname = the host's name)."""
        h = self.hosts[host]
        tmp = self._tmp_root / host
        tmp.mkdir(exist_ok=True)
        env = {**(os.environ if env is None else env), "TMPDIR": str(tmp)}
        wrapped = ["ip", "netns", "exec", h.netns, "unshare", "--uts", "--", "sh", "-c",
                   f'hostname {h.name}-{self.prefix} && exec "$@"', "sh", *cmd]
        out = open(log_path, "ab") if log_path is not None else subprocess.DEVNULL  # noqa: SIM115
        try:
            proc = subprocess.Popen(wrapped, env=env, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        finally:
            if log_path is not None:
                out.close()  # type: ignore[union-attr]
        self._procs.append(proc)
        return proc

    def call(self, host: str, fn: Callable[[], T], timeout_s: float = 300.0) -> T:
        """`fn()` in a thread inside `host`'s network namespace; its result (or its exception).

        Only sockets opened by this thread are in the host. A library that connects from threads of its own
        (gRPC's event engine) may connect from the machine's namespace instead, where the lab's addresses
        lead elsewhere: run such a client as a process on the host (`exec`, `spawn`)."""
        path = f"/var/run/netns/{self.hosts[host].netns}"
        box: dict[str, object] = {}

        def run() -> None:
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                fd = os.open(path, os.O_RDONLY)
                try:
                    if libc.setns(fd, CLONE_NEWNET) != 0:
                        raise OSError(ctypes.get_errno(), f"setns into {path} failed")
                finally:
                    os.close(fd)
                box["value"] = fn()
            except BaseException as exc:
                box["error"] = exc

        t = threading.Thread(target=run, name=f"netns-{host}", daemon=True)
        t.start()
        t.join(timeout_s)
        if t.is_alive():
            raise TimeoutError(f"call in {host} did not return in {timeout_s:.0f}s")
        if "error" in box:
            raise box["error"]  # type: ignore[misc]
        return box["value"]  # type: ignore[return-value]

    def exec(self, host: str, *cmd: str, timeout_s: float = 120.0) -> str:
        """`cmd` run to its end on `host`: its stdout; its stderr in the error when it fails."""
        done = subprocess.run(["ip", "netns", "exec", self.hosts[host].netns, *cmd], capture_output=True,
                              text=True, timeout=timeout_s)
        if done.returncode != 0:
            raise RuntimeError(f"{cmd[0]} on {host} exited {done.returncode}: {done.stderr[-2000:]}")
        return done.stdout

    # ---- links ----
    def shape(self, host: str, *, rate_mbit: float | None = None, delay_ms: float = 0.0,
              loss_pct: float = 0.0) -> None:
        """Delay/loss (netem) and rate (tbf under it) on both directions of `host`'s link."""
        if not self._has_netem():
            return self._shape_with_delay_line(host, rate_mbit, delay_ms, loss_pct)
        for ns, dev in ((self.hosts[host].netns, "eth0"), (self.switch, self._switch_port(host))):
            netem = ["ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", dev, "root", "handle", "1:", "netem",
                     "delay", f"{delay_ms}ms", "loss", f"{loss_pct}%", "limit", "100000"]
            _run(*netem)
            if rate_mbit is not None:
                # burst: at least one timer tick of bytes at this rate; latency bounds the queue
                burst = max(int(rate_mbit * 1e6 / 8 / 250), 64 * 1024)
                _run("ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", dev, "parent", "1:1", "handle", "10:",
                     "tbf", "rate", f"{rate_mbit}mbit", "burst", str(burst), "latency", "50ms")

    def _has_netem(self) -> bool:
        probe = subprocess.run(["ip", "netns", "exec", self.switch, "tc", "qdisc", "replace", "dev", "lo", "root",
                                "netem", "delay", "0ms"], capture_output=True, text=True)
        subprocess.run(["ip", "netns", "exec", self.switch, "tc", "qdisc", "del", "dev", "lo", "root"],
                       capture_output=True)
        return probe.returncode == 0

    def _shape_with_delay_line(self, host: str, rate_mbit: float | None, delay_ms: float, loss_pct: float) -> None:
        """No netem here: `host`'s veth pair becomes two TAPs joined by a DelayLine (made once, then retuned)."""
        h, port = self.hosts[host], self._switch_port(host)
        line = self._delay_lines.get(host)
        if line is None:
            _run("ip", "-n", self.switch, "link", "del", port)  # its peer, the host's eth0, goes with it
            line = DelayLine(open_tap(f"/var/run/netns/{h.netns}", "eth0"),
                             open_tap(f"/var/run/netns/{self.switch}", port), delay_ms / 1e3, loss_pct / 100)
            self._delay_lines[host] = line
            _run("ip", "-n", self.switch, "link", "set", port, "master", "br0", "up")
            _run("ip", "-n", h.netns, "addr", "add", f"{h.address}/24", "dev", "eth0")
            _run("ip", "-n", h.netns, "link", "set", "eth0", "up")
        line.delay_s, line.loss = delay_ms / 1e3, loss_pct / 100
        for ns, dev in ((h.netns, "eth0"), (self.switch, port)):
            subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", dev, "root"], capture_output=True)
            if rate_mbit is not None:
                burst = max(int(rate_mbit * 1e6 / 8 / 250), 64 * 1024)
                _run("ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", dev, "root", "handle", "10:",
                     "tbf", "rate", f"{rate_mbit}mbit", "burst", str(burst), "latency", "50ms")

    def unshape(self, host: str) -> None:
        for ns, dev in ((self.hosts[host].netns, "eth0"), (self.switch, self._switch_port(host))):
            subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", dev, "root"], capture_output=True)

    def cut(self, host: str) -> None:
        """Take `host`'s link down (a pulled cable): its processes live on, unreachable."""
        _run("ip", "-n", self.switch, "link", "set", self._switch_port(host), "down")

    def restore(self, host: str) -> None:
        _run("ip", "-n", self.switch, "link", "set", self._switch_port(host), "up")

    def delete(self, host: str) -> None:
        """Remove `host`'s link, then its namespace; processes in it stay, cut off, until `close`.

        The link goes first because `ip netns del` only drops the namespace's name: the kernel keeps the
        namespace, veth included, for as long as a process lives in it, so the host would stay connected."""
        line = self._delay_lines.pop(host, None)
        if line is not None:
            line.close()  # closing the TAPs removes them
        else:
            _run("ip", "-n", self.switch, "link", "del", self._switch_port(host))  # and its peer, the host's eth0
        _run("ip", "netns", "del", self.hosts[host].netns)
        self._made.remove(self.hosts[host].netns)

    def close(self) -> None:
        """Kill what was started, remove every namespace (veths, bridge and qdiscs go with them)."""
        for proc in self._procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for proc in self._procs:  # all were sent SIGTERM above: they stop in parallel
            stop_process(proc, timeout_s=10)
        self._procs.clear()
        for line in self._delay_lines.values():
            line.close()
        self._delay_lines.clear()
        for ns in reversed(self._made):
            _kill_netns_pids(ns)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self._made.clear()
        shutil.rmtree(self._tmp_root, ignore_errors=True)
        remove_empty_dirs(python_env_dirs() - self._python_envs_before)
