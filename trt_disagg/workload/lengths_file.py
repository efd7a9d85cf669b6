"""A workload users bring: prompt and output lengths (and optionally arrival times) from a CSV or JSON file.

    CSV   header row, then one request per row:   input_len,output_len[,arrival_s]
    JSON  a list of objects (or {"requests": [...]}) with the same keys

`prompt_len` / `output_tokens`-style names of other tools are accepted as aliases (see `ALIASES`). Every
bad value is a UserError naming the file, the row and the field: a missing or non-integer length, a length
< 1, a negative or missing arrival time (when the file has any). Rows are sorted by arrival time when given.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trt_disagg.errors import UserError

ALIASES = {
    "input_len": ("input_len", "prompt_len", "input_tokens", "prompt_tokens"),
    "output_len": ("output_len", "output_tokens", "completion_tokens"),
    "arrival_s": ("arrival_s", "arrival_time_s"),
}


@dataclass(frozen=True)
class LengthsTrace:
    input_len: list[int]
    output_len: list[int]
    arrival_s: list[float] | None  # seconds from the trace's start; None when the file has none


def read_lengths_file(path: str | Path) -> LengthsTrace:
    p = Path(path)
    rows = _rows(p)
    if not rows:
        raise UserError(f"--lengths-file {p}: no requests in the file")
    has_arrivals = any(_pick(r, "arrival_s") is not None for r in rows)
    parsed = []
    for n, row in enumerate(rows, start=1):
        where = f"--lengths-file {p}: row {n}"
        inp, out = _length(row, "input_len", where), _length(row, "output_len", where)
        arrival = _arrival(row, where) if has_arrivals else 0.0
        parsed.append((arrival, inp, out))
    if has_arrivals:
        parsed.sort(key=lambda t: t[0])
    return LengthsTrace([t[1] for t in parsed], [t[2] for t in parsed],
                        [t[0] for t in parsed] if has_arrivals else None)


def _rows(p: Path) -> list[dict[str, Any]]:
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise UserError(f"--lengths-file {p}: cannot read it: {exc.strerror or exc}") from None
    if p.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"--lengths-file {p}: not valid JSON: {exc}") from None
        data = data.get("requests") if isinstance(data, dict) else data
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise UserError(f"--lengths-file {p}: expected a JSON list of objects with input_len and output_len")
        return data
    return list(csv.DictReader(line for line in text.splitlines() if line.strip()))


def _pick(row: dict[str, Any], field: str) -> Any:
    for name in ALIASES[field]:
        value = row.get(name)
        if value is not None and str(value).strip() != "":
            return value
    return None


def _length(row: dict[str, Any], field: str, where: str) -> int:
    value = _pick(row, field)
    if value is None:
        raise UserError(f"{where}: missing {field}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{where}: {field} must be an integer, got {value!r}") from None
    if number != int(number):
        raise UserError(f"{where}: {field} must be an integer, got {value!r}")
    if number < 1:
        raise UserError(f"{where}: {field} must be >= 1, got {value!r}")
    return int(number)


def _arrival(row: dict[str, Any], where: str) -> float:
    value = _pick(row, "arrival_s")
    if value is None:
        raise UserError(f"{where}: missing arrival_s (other rows have one)")
    try:
        t = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{where}: arrival_s must be a number of seconds, got {value!r}") from None
    if not t >= 0:
        raise UserError(f"{where}: arrival_s must be >= 0, got {value!r}")
    return t
