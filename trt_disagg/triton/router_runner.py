"""`python -m trt_disagg.triton.router_runner CONFIG --redis-url URL`: the router process `serve` starts.

A separate process (like the instances) so that `serve` only supervises; the router package owns the app
(`router.app.create_app`, `router.settings.RouterSettings.from_deployment`).
"""

from __future__ import annotations

import argparse
import logging


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="trt_disagg.triton.router_runner")
    parser.add_argument("config")
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--port", type=int, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    import uvicorn

    from router.app import create_app
    from router.settings import RouterSettings
    from trt_disagg.config import load_deployment

    dep = load_deployment(args.config)
    overrides = {} if args.port is None else {"port": args.port}
    settings = RouterSettings.from_deployment(dep, args.redis_url, **overrides)
    # Streams in flight get a short grace period; `serve` kills the router after 10 s anyway.
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="info",
                timeout_graceful_shutdown=3)


if __name__ == "__main__":
    main()
