"""`python -m router CONFIG --redis-url URL`: the router process (`trt-disagg serve` starts one).

Another router of the same deployment (another host, or more throughput) runs the same command with the
shared `--redis-url` and its own `--router-id`; every router reads the same deployment YAML, which is why
the id is a flag (or env TRT_DISAGG_ROUTER_ROUTER_ID) and not part of the YAML.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Annotated

import typer

from router.settings import RouterSettings
from trt_disagg.config import load_deployment
from trt_disagg.errors import UserError

ADMIN_TOKEN_ENV = "TRT_DISAGG_ROUTER_ADMIN_TOKEN"


def settings_for(config: Path, redis_url: str, port: int | None = None,
                 router_id: str | None = None, host: str | None = None,
                 engines_dir: Path | None = None) -> RouterSettings:
    """The router settings of deployment `config`, with the command line's overrides (and the admin token
    from env TRT_DISAGG_ROUTER_ADMIN_TOKEN: every router of a deployment is given the same one).
    `engines_dir` replaces the YAML's `engines_dir` (as `trt-disagg serve --engines-dir` does for the
    instances), so the router reads its tokenizer and limits from the engines that are being served."""
    dep = load_deployment(config)
    overrides: dict[str, object] = {} if port is None else {"port": port}
    if engines_dir is not None:
        overrides["engine_dir"] = dep.engine_dir(next(iter(dep.groups())), engines_dir)
    if router_id:
        overrides["router_id"] = router_id
    if host:
        overrides["host"] = host
    if os.environ.get(ADMIN_TOKEN_ENV):
        overrides["admin_token"] = os.environ[ADMIN_TOKEN_ENV]
    return RouterSettings.from_deployment(dep, redis_url, **overrides)


def main(
    config: Annotated[Path, typer.Argument(help="the deployment YAML")],
    redis_url: Annotated[str, typer.Option(envvar="REDIS_URL", help="Redis/Valkey shared by the deployment "
                                           "(redis://:PASSWORD@host:port/0, rediss:// for TLS; env REDIS_URL keeps "
                                           "the password off the command line)")],
    port: Annotated[int | None, typer.Option(help="default: the deployment's router.port")] = None,
    router_id: Annotated[str | None, typer.Option(
        help="this router's identity in Redis, stable across restarts (default: env TRT_DISAGG_ROUTER_ROUTER_ID, "
             "else host:port); unique per router")] = None,
    host: Annotated[str | None, typer.Option(help="address to listen on (default: the deployment's router.host)")] = None,
    engines_dir: Annotated[Path | None, typer.Option(help="engines directory (default: the deployment's "
                                                     "engines_dir)")] = None,
) -> None:
    try:
        settings = settings_for(config, redis_url, port, router_id, host, engines_dir)
    except UserError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    import uvicorn

    from router.app import create_app
    from router.serving import DrainingServer

    app = create_app(settings)
    # The drain (router/serving.py) finishes or ends the streams; what uvicorn closes after it is idle.
    server_config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level="info",
                                   timeout_graceful_shutdown=3)
    DrainingServer(server_config, app).run()


if __name__ == "__main__":
    typer.run(main)
