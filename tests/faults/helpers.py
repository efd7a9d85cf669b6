"""Helpers for the fault tests: find our processes and their listening sockets through /proc, read the
registry as a router does, and wait for another process's state by polling with a deadline (never a fixed
sleep)."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import redis.asyncio as aioredis

from trt_disagg.contract import Role
from trt_disagg.registry_read import list_instances
from trt_disagg.triton.launch import group_members

REPO = Path(__file__).resolve().parents[2]
TINY_CONFIG = REPO / "configs" / "tiny.yaml"
POLL_S = 0.05


def wait_for(predicate: Callable[[], bool], timeout_s: float, what: str) -> float:
    """Poll `predicate` until it holds; the seconds it took. AssertionError naming `what` at the deadline."""
    t0 = time.monotonic()
    while not predicate():
        if time.monotonic() - t0 > timeout_s:
            raise AssertionError(f"{what}: not within {timeout_s:.0f}s")
        time.sleep(POLL_S)  # polling another process's state
    return time.monotonic() - t0


def registered(redis_url: str, role: Role) -> set[str]:
    """Instance ids the registry lists for `role`, read as a router reads them (which prunes the dead)."""
    async def read() -> set[str]:
        client = aioredis.from_url(redis_url, socket_connect_timeout=1.0, socket_timeout=1.0)
        try:
            return {i.instance_id for i in await list_instances(client, role)}
        except (OSError, aioredis.RedisError):
            return set()  # Redis down or restarting: nothing is listed
        finally:
            await client.aclose()

    return asyncio.run(read())


def _stat_fields(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def state(pid: int) -> str:
    """A process's state letter ("Z" for a zombie, and for a process that is gone)."""
    fields = _stat_fields(pid)
    return "Z" if fields is None else fields[0]


def ppid(pid: int) -> int:
    fields = _stat_fields(pid)
    return -1 if fields is None else int(fields[1])


def descendants(pid: int) -> list[int]:
    """`pid` and every live process below it (children started in their own sessions included)."""
    children: dict[int, list[int]] = {}
    for p in live_pids():
        children.setdefault(ppid(p), []).append(p)
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def live_pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def group_pids(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group `pgid`: a tritonserver, its stub, its rank processes."""
    return group_members(pgid)


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def pids_mentioning(text: str) -> list[int]:
    return [pid for pid in live_pids() if text in cmdline(pid) and (_stat_fields(pid) or ["Z"])[0] != "Z"]


def rank_pids(pgid: int) -> list[int]:
    """The rank processes of the instance whose tritonserver leads group `pgid` (torch spawn children)."""
    return sorted(pid for pid in group_pids(pgid) if "multiprocessing.spawn" in cmdline(pid))


def _socket_inodes(pid: int) -> set[str]:
    out = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                out.add(target[8:-1])
    except OSError:
        pass
    return out


def _addr(hex_addr: str) -> str:
    if len(hex_addr) == 8:  # IPv4, little-endian
        return ".".join(str(int(hex_addr[i:i + 2], 16)) for i in (6, 4, 2, 0))
    words = [hex_addr[i:i + 8] for i in range(0, 32, 8)]  # IPv6: four little-endian 32-bit words
    raw = b"".join(bytes.fromhex(w)[::-1] for w in words)
    return str(ipaddress.IPv6Address(raw))


def listeners(pids: list[int]) -> list[tuple[int, str, int]]:
    """(pid, address, port) of every listening TCP socket the given processes hold (/proc/net/tcp{,6})."""
    by_inode: dict[str, tuple[str, int]] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            if f[3] == "0A":  # LISTEN
                host, port = f[1].split(":")
                by_inode[f[9]] = (_addr(host), int(port, 16))
    out = []
    for pid in pids:
        for inode in _socket_inodes(pid):
            if inode in by_inode:
                out.append((pid, *by_inode[inode]))
    return out


WILDCARDS = {"0.0.0.0", "::"}


def shm_prefixes(server_pid: int) -> tuple[str, ...]:
    """The /dev/shm name prefixes a tritonserver of ours owns: its Python-backend regions (on its command
    line) and its instance's KV segments (in its environment)."""
    out = []
    for arg in cmdline(server_pid).split():
        if "shm-region-prefix-name=" in arg:
            out.append(arg.split("shm-region-prefix-name=", 1)[1])
    try:
        env = Path(f"/proc/{server_pid}/environ").read_bytes().split(b"\0")
    except OSError:
        env = []
    out += [e.decode().split("=", 1)[1] for e in env if e.startswith(b"TRTD_KV_SHM_PREFIX=")]
    return tuple(out)


def shm_left(prefixes: tuple[str, ...]) -> list[str]:
    return [n for n in os.listdir("/dev/shm") if n.startswith(prefixes)]


# what processes of ours could leave in the system temporary directory when killed: multiprocessing's socket
# directories, Triton's Python-backend environment directory, an instance's own TMPDIR
TEMP_LEFTOVER_PREFIXES = ("pymp-", "python_env_", "trtd-")


def temp_entries(prefixes: tuple[str, ...] = TEMP_LEFTOVER_PREFIXES) -> set[str]:
    return {n for n in os.listdir(tempfile.gettempdir()) if n.startswith(prefixes)}
