"""Atomic engine directories: build into a hidden temp dir next to the target, rename when complete.

    engines/<deployment>/.<role>.tmp-<pid>/   being written (never read by anything)
    engines/<deployment>/<role>/              complete; the only name loaders and the builder trust

A build killed midway leaves at most a `.tmp-<pid>` dir, which the next build removes (when that pid is no
longer running) before it writes anything. `rename` within one directory is atomic on POSIX, so a reader
sees either the old engine, no engine, or the new one, never half of one.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

_TMP_RE = re.compile(r"^\.(?P<name>.+)\.(?:tmp|ckpt)-(?P<pid>\d+)$")


def staging_path(target: Path, kind: str = "tmp") -> Path:
    return target.parent / f".{target.name}.{kind}-{os.getpid()}"


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # a leftover of this very process (an earlier, failed build call)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(parent: Path) -> list[Path]:
    """Remove temp dirs of builds whose process is gone; returns what was removed."""
    removed: list[Path] = []
    if not parent.is_dir():
        return removed
    for entry in parent.iterdir():
        m = _TMP_RE.match(entry.name)
        if m and entry.is_dir() and not _pid_alive(int(m.group("pid"))):
            log.warning("removing %s left by an interrupted build", entry)
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def _fresh_tmp(target: Path, kind: str) -> Path:
    """An empty temp dir next to `target` (a leftover from an earlier try of this process is emptied)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = staging_path(target, kind)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


@contextmanager
def staged_dir(target: Path, kind: str = "tmp") -> Iterator[Path]:
    """Yield an empty temp dir; on success it replaces `target`, on any exception it is removed."""
    tmp = _fresh_tmp(target, kind)
    try:
        yield tmp
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def scratch_dir(target: Path, kind: str = "ckpt") -> Iterator[Path]:
    """A temp dir next to `target` that is always removed (e.g. the TensorRT-LLM checkpoint)."""
    tmp = _fresh_tmp(target, kind)
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
