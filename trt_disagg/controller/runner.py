"""The controller inside `trt-disagg serve --autoscale`: its own thread and event loop, next to the supervisor.

    serve (main thread): start the cluster ─▶ AutoscaleRunner.start() ─▶ supervisor ticks ... signal
                         ─▶ AutoscaleRunner.stop() ─▶ cluster.stop()
    runner thread:       asyncio loop: ControllerLoop.run (Redis client on the deployment's Redis)
    actuator worker:     one change at a time (LocalClusterActuator)

`stop` ends the loop at once (it waits on an event, not a sleep), then closes the actuator, which abandons a
change in progress and waits for its worker: the cluster's clean-up never races a start or a retirement.
Each decision goes to `on_decision` (serve prints it as one line) and to the metrics, served on their own
port when one is given (the router's /metrics belongs to the router process).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from typing import Any

from trt_disagg.controller.live import ControllerLoop, LoopSettings
from trt_disagg.controller.local_actuator import LocalClusterActuator
from trt_disagg.controller.metrics import ControllerMetrics
from trt_disagg.controller.policy import Controller, Decision

log = logging.getLogger(__name__)


class AutoscaleRunner:
    def __init__(self, redis_url: str, controller: Controller, actuator: LocalClusterActuator,
                 on_decision: Callable[[Decision], None], metrics_addr: tuple[str, int] | None = None) -> None:
        self.redis_url = redis_url
        self.controller = controller
        self.actuator = actuator
        self.metrics = ControllerMetrics()
        self._on_decision = on_decision
        self._metrics_addr = metrics_addr
        self._metrics_server: Any = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._started = threading.Event()
        self.metrics_url: str | None = None

    def start(self) -> None:
        if self._metrics_addr is not None:
            from prometheus_client import start_http_server

            host, port = self._metrics_addr
            self._metrics_server, _ = start_http_server(port, addr=host, registry=self.metrics.registry)
            self.metrics_url = f"http://{host}:{self._metrics_server.server_port}/metrics"
        self._thread = threading.Thread(target=self._main, name="autoscaler", daemon=True)
        self._thread.start()
        self._started.wait(10.0)

    def _main(self) -> None:
        asyncio.run(self._run())

    async def _run(self) -> None:
        import redis.asyncio as aioredis

        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        self._started.set()
        client = aioredis.from_url(self.redis_url, socket_connect_timeout=2.0, socket_timeout=5.0)
        loop = ControllerLoop(client, self.controller, self.actuator, LoopSettings(), on_decision=self._decided)
        try:
            await loop.run(self._stop)
        except Exception:  # the deployment goes on serving with the shape it has
            log.exception("autoscaler stopped by an error; the deployment keeps its shape")
        finally:
            await client.aclose()

    def _decided(self, decision: Decision) -> None:
        self.metrics.observe(decision)
        self._on_decision(decision)

    def stop(self, timeout_s: float = 60.0) -> None:
        """End the loop, abandon a change in progress, stop the metrics server; idempotent."""
        if self._loop is not None and self._stop is not None and not self._loop.is_closed():
            try:
                self._loop.call_soon_threadsafe(self._stop.set)
            except RuntimeError:  # the loop ended meanwhile
                pass
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None
        self.actuator.close(timeout_s)
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
            self._metrics_server = None


def decision_line(d: Decision) -> str:
    """One line per decision, as serve prints it: when, shape, action and the reason."""
    import time

    when = time.strftime("%H:%M:%S", time.localtime(d.at_s))
    what = f"{d.action.value} -> {d.next_shape}" if d.failed is None and d.action.value != "none" else (
        f"{d.failed.value} FAILED" if d.failed is not None else "none")
    return f"autoscale {when} {d.shape} {what}: {d.reason}"
