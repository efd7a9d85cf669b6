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
