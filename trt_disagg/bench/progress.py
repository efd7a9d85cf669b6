"""A rich progress bar for benchmark runs: one task per rate, advanced as each request finishes.

It plugs into the load generator's callbacks (`on_run`, `on_record`), so the load generator itself stays
free of display code and the Python API can run without a terminal.
"""

from __future__ import annotations

from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from trt_disagg.bench.metrics import RequestRecord


class RunProgress:
    """Context manager: `with RunProgress() as p: await run_rates(..., on_run=p.on_run, on_record=p.on_record)`."""

    def __init__(self, console: Console | None = None, enabled: bool = True) -> None:
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("failed {task.fields[failed]}"),
            TimeElapsedColumn(),
            console=console or Console(stderr=True),
            disable=not enabled,
            transient=False,
        )
        self._task: TaskID | None = None
        self._failed = 0

    def __enter__(self) -> RunProgress:
        self._progress.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._progress.stop()

    def on_run(self, rate_rps: float, num_requests: int) -> None:
        self._failed = 0
        self._task = self._progress.add_task(f"{rate_rps:.4g} req/s", total=num_requests, failed=0)

    def on_record(self, rec: RequestRecord) -> None:
        if self._task is None:
            return
        self._failed += 0 if rec.ok else 1
        self._progress.update(self._task, advance=1, failed=self._failed)
