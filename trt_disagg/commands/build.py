"""`trt-disagg build CONFIG`: write engines/<deployment>/<role>/ for every role (see trt_disagg/engine_build/).

Progress is drawn with rich on stderr (one bar per role, advanced per rank shard); the summary table and,
for the tensorrtllm backend, the exact TensorRT-LLM commands go to stdout so they can be piped to a file.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from trt_disagg.config import Deployment, load_deployment
from trt_disagg.contract import Role
from trt_disagg.engine_build.builder import BuildStatus, RolePlan, RoleResult, build_deployment
from trt_disagg.engine_build.tensorrtllm import BuildFailed

out = Console()
err = Console(stderr=True)


class RichObserver:
    """Draws the builder's progress: one task per role."""

    def __init__(self, progress: Progress) -> None:
        self._progress = progress
        self._tasks: dict[Role, TaskID] = {}

    def message(self, text: str) -> None:
        self._progress.console.print(f"[dim]{text}[/dim]")

    def role_started(self, plan: RolePlan) -> None:
        desc = f"{plan.role.value} ({plan.backend} tp={plan.group.tp} pp={plan.group.pp})"
        self._tasks[plan.role] = self._progress.add_task(desc, total=plan.num_steps, status="")

    def role_step(self, role: Role, description: str) -> None:
        task = self._tasks.get(role)
        if task is not None:
            self._progress.update(task, advance=1, status=description)

    def role_finished(self, result: RoleResult) -> None:
        task = self._tasks.get(result.role)
        if task is not None:
            self._progress.update(task, status=str(result.status))


def _summary(results: list[RoleResult]) -> Table:
    table = Table(title="engines")
    for col in ("role", "backend", "tp", "pp", "status", "seconds"):
        table.add_column(col)
    table.add_column("engine dir", overflow="fold")
    for r in results:
        table.add_row(r.role.value, r.backend, str(r.tp), str(r.pp), str(r.status), f"{r.seconds:.1f}",
                      str(r.engine_dir))
    return table


def build_with_progress(dep: Deployment, *, engines_root: Path | None = None, roles: list[str] | None = None,
                        force: bool = False, dry_run: bool = False) -> list[RoleResult]:
    """`build_deployment` with a rich progress bar per role on stderr (also used by `trt-disagg demo`)."""
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
               TextColumn("{task.completed}/{task.total} {task.fields[status]}"), TimeElapsedColumn())
    with Progress(*columns, console=err, transient=False) as progress:
        return build_deployment(dep, engines_root=engines_root, roles=roles, force=force, dry_run=dry_run,
                                observer=RichObserver(progress))


def build_cmd(
    config: Annotated[Path, typer.Argument(help="deployment YAML (configs/*.yaml)")],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="validate and print what would be built; "
                                          "tensorrtllm: print the exact commands")] = False,
    role: Annotated[list[str] | None, typer.Option("--role", help="build only this role (repeatable): "
                                                   "prefill, decode, colocated")] = None,
    force: Annotated[bool, typer.Option("--force", help="rebuild even when the engine is up to date")] = False,
    engines_dir: Annotated[Path | None, typer.Option("--engines-dir", help="root of the engine dirs "
                                                     "(default: the config's engines_dir)")] = None,
) -> None:
    """Convert the model source into per-rank shards: one engine dir per role of the deployment."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    dep = load_deployment(config)
    try:
        results = build_with_progress(dep, engines_root=engines_dir, roles=role, force=force, dry_run=dry_run)
    except BuildFailed as exc:  # a TensorRT-LLM tool failed; its own output above says why
        err.print(f"[red]build failed:[/red] {exc}")
        raise typer.Exit(1) from None
    out.print(_summary(results))
    for r in results:
        if r.commands is not None and r.status is not BuildStatus.UP_TO_DATE:
            verb = "would run" if r.status is BuildStatus.DRY_RUN else "ran"
            out.print(f"# {r.role.value}: TensorRT-LLM commands ({verb})", highlight=False)
            out.print(r.commands.to_shell(), highlight=False, markup=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    """Add `build` to the CLI."""
    app.command("build")(build_cmd)
