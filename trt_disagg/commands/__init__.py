"""CLI sub-commands, one module per area (build, serve, plan, bench...)."""

from __future__ import annotations

import typer


def register_all(app: typer.Typer) -> None:
    from trt_disagg.commands import autoscale, bench, build, demo, plan, serve, simulate

    # The order of `trt-disagg --help`: the planning path reads plan, simulate, profile.
    for register in (build.register, serve.register, plan.register, simulate.register, plan.register_profile,
                     bench.register, demo.register, autoscale.register):
        register(app)
