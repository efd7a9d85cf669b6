"""`python -m trt_disagg.triton.router_runner CONFIG --redis-url URL`: the router process `serve` starts.

A separate process (like the instances) so that `serve` only supervises; the router package owns the app
(`router.app.create_app`, `router.settings.RouterSettings.from_deployment`). Another router of the same
deployment on another host runs the same command with the shared `--redis-url` and its own `--router-id`.
"""

from __future__ import annotations

import argparse
import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from router.settings import RouterSettings


def settings_from_args(argv: list[str] | None = None) -> RouterSettings:
    parser = argparse.ArgumentParser(prog="trt_disagg.triton.router_runner")
    parser.add_argument("config")
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--port", type=int, default=None)
    parser.add_argument("--router-id", default=None, help="this router's identity in Redis, stable across restarts "
                        "(default: env TRT_DISAGG_ROUTER_ROUTER_ID, else host:port); unique per router")
    args = parser.parse_args(argv)

    from router.settings import RouterSettings
    from trt_disagg.config import load_deployment

    overrides: dict[str, object] = {} if args.port is None else {"port": args.port}
    if args.router_id:
        overrides["router_id"] = args.router_id
    return RouterSettings.from_deployment(load_deployment(args.config), args.redis_url, **overrides)


def main(argv: list[str] | None = None) -> None:
    settings = settings_from_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    import uvicorn

    from router.app import create_app

    # Streams in flight get a short grace period; `serve` kills the router after 10 s anyway.
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="info",
                timeout_graceful_shutdown=3)


if __name__ == "__main__":
    main()
