"""The unit of every workload: one request's prompt and its lengths."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class WorkloadRequest:
    """One request of a workload.

    `prompt_ids`, when set, is authoritative: it holds exactly `input_len` token ids of the model's tokenizer.
    Without a tokenizer only `prompt` (text) is set and `input_len` is an estimate (see `estimate_tokens`).
    `output_len` is the number of tokens to generate (the reference answer's length for real data sets).
    """

    prompt: str | None
    prompt_ids: list[int] | None
    input_len: int
    output_len: int


def estimate_tokens(text: str) -> int:
    """A cheap token count without a tokenizer: ~4 characters per token (GPT-2-style BPE on English text).

    Good to about ±20% on chat text; use a real tokenizer when the counts matter (benchmarks against an engine).
    """
    return max(1, (len(text) + 3) // 4)


@dataclass(frozen=True)
class WorkloadReport:
    """How a workload was made: what the plan output says about it (and what a reader needs to trust it).

    `token_counts` says where the lengths come from: "tokenizer:<name>" (real counts), "estimate" (~4
    characters per token, `estimate_tokens`: the model's tokenizer is not available offline) or "given" (a
    lengths file, or the fixed workload's numbers). Dropped and truncated requests are counted by reason, so
    no limit changes the workload silently.
    """

    source: str  # the workload name, or "lengths file <path>"
    token_counts: str
    num_examined: int  # candidate requests looked at before the quota was met
    num_kept: int  # distinct requests that passed the filters (resampled with replacement up to the quota)
    dropped: dict[str, int]  # reason -> requests dropped for it
    truncated: int  # requests cut to fit (--long-prompts truncate)
    long_prompts: str  # drop | truncate


@dataclass(frozen=True)
class LoadedWorkload:
    requests: list[WorkloadRequest]
    report: WorkloadReport
    arrival_s: list[float] | None = None  # a trace's own arrival times (lengths file), else None
