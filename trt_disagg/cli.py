"""The `trt-disagg` command. Each area registers its own sub-commands; this file only composes them.

Bad input raises `UserError` anywhere below; it is printed in red with exit code 2, never a traceback.
"""

from __future__ import annotations

import sys

import typer
from rich.console import Console

from trt_disagg.errors import EXIT_USAGE, UserError

app = typer.Typer(help="Disaggregated prefill/decode serving: plan, build, serve, benchmark.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
console = Console(stderr=True)


def _register_commands() -> None:
    # Imported here, not at module level, so `trt-disagg --help` stays fast and each area owns its commands.
    from trt_disagg.commands import register_all

    register_all(app)


def main() -> None:
    _register_commands()
    try:
        app()
    except UserError as exc:
        console.print(f"[red]error:[/red] {exc}")
        sys.exit(EXIT_USAGE)


if __name__ == "__main__":
    main()
