"""CLI sub-commands, one module per area (build, serve, plan, bench...)."""

from __future__ import annotations

import typer


def register_all(app: typer.Typer) -> None:
    from trt_disagg.commands import bench, build, demo, plan, serve

    for module in (build, serve, plan, bench, demo):
        module.register(app)
