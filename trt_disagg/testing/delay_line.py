"""A link with delay and loss for kernels built without netem: two TAP devices and a thread per direction.

    host namespace: eth0 (TAP) ─fd─▶ [reader] ─ (due = now + delay, drop with loss) ─▶ [writer] ─fd─▶ p<k> (TAP) :switch
                    eth0 (TAP) ◀─fd─ [writer] ◀──────────────────────────────────── [reader] ◀─fd─ p<k> (TAP)

Where `tc qdisc ... netem` is missing (CONFIG_NET_SCH_NETEM off, as on some VM kernels), `NetnsLab.shape`
replaces a host's veth pair by this: each end is a TAP device created inside its namespace, the frames
between them pass through this process, which holds each one `delay_s` and drops a share `loss`. tbf on the
TAPs' egress still sets the rate. The TAPs carry virtio-net headers with TSO/checksum offload, so TCP hands
over 64 KiB segments and the threads move a few thousand frames per second at 1 Gbit/s, not 80 thousand; the
frames keep their Ethernet MTU semantics (the kernel segments at the far end when it has to).
"""

from __future__ import annotations

import ctypes
import fcntl
import logging
import os
import queue
import random
import select
import struct
import threading
import time

log = logging.getLogger(__name__)

TUNSETIFF, TUNSETOFFLOAD = 0x400454CA, 0x400454D0
IFF_TAP, IFF_NO_PI, IFF_VNET_HDR = 0x0002, 0x1000, 0x4000
TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6 = 0x01, 0x02, 0x04
CLONE_NEWNET = 0x40000000
MAX_FRAME_BYTES = 65536 + 64  # a 64 KiB GSO frame plus its virtio-net and Ethernet headers


def open_tap(netns_path: str, name: str) -> int:
    """A TAP device `name` created inside the namespace at `netns_path`; returns its fd (usable from any thread)."""
    box: dict[str, object] = {}

    def make() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            ns = os.open(netns_path, os.O_RDONLY)
            try:
                if libc.setns(ns, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns into {netns_path} failed")
            finally:
                os.close(ns)
            fd = os.open("/dev/net/tun", os.O_RDWR)
            fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR))
            fcntl.ioctl(fd, TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6)
            box["fd"] = fd
        except BaseException as exc:
            box["error"] = exc

    t = threading.Thread(target=make, name=f"tap-{name}", daemon=True)  # setns changes only this thread
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["fd"]  # type: ignore[return-value]


class DelayLine:
    """Frames between two TAP fds, each held `delay_s` and dropped with probability `loss`; `close` stops it."""

    def __init__(self, fd_a: int, fd_b: int, delay_s: float, loss: float = 0.0) -> None:
        self.delay_s = delay_s
        self.loss = loss
        self._fds: tuple[int, ...] = (fd_a, fd_b)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        for src, dst, name in ((fd_a, fd_b, "a-b"), (fd_b, fd_a, "b-a")):
            frames: queue.SimpleQueue[tuple[float, bytes] | None] = queue.SimpleQueue()
            self._threads += [threading.Thread(target=self._read, args=(src, frames), name=f"delay-read-{name}",
                                               daemon=True),
                              threading.Thread(target=self._write, args=(dst, frames), name=f"delay-write-{name}",
                                               daemon=True)]
        for t in self._threads:
            t.start()

    def _read(self, fd: int, frames: queue.SimpleQueue) -> None:
        rng = random.Random()
        try:
            while not self._stop.is_set():
                # a read blocked on a TAP is not woken by close(): wait with a timeout, then look at _stop
                if not select.select([fd], [], [], 0.2)[0]:
                    continue
                frame = os.read(fd, MAX_FRAME_BYTES)
                if self.loss and rng.random() < self.loss:
                    continue
                frames.put((time.monotonic() + self.delay_s, frame))
        except OSError:
            pass  # the fd was closed: the line is being taken down
        finally:
            frames.put(None)

    def _write(self, fd: int, frames: queue.SimpleQueue) -> None:
        while (item := frames.get()) is not None:
            due, frame = item
            wait = due - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            try:
                os.write(fd, frame)
            except OSError as exc:  # a frame the far side refused (its device down): a lost frame
                if self._stop.is_set():
                    return
                log.debug("delay line dropped a frame: %s", exc)

    def close(self) -> None:
        """Stop both directions, then close both TAPs (which removes the devices); idempotent."""
        self._stop.set()
        for t in self._threads:
            t.join(timeout=2)
        for fd in self._fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds = ()
