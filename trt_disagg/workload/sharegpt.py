"""ShareGPT as DistServe prepared it: multi-turn prompts, the next turn as the output.

    conversation (>= 3 turns)   t0, t1, ..., t(n-1)
    k                           seeded, uniform in [1, n - 1]
    prompt                      "\\n".join(t0 .. t(k-1))         (the k leading turns)
    output                      t(k)                             (the next turn)
    dropped                     prompt < 4 and output < 4 tokens; prompt + output >= the model's context

This is DistServe's `0-prepare-dataset.py` (its chatbot workload, whose ratios the paper reports). On the
packaged data it gives prompts ~7x longer than the first-turn pairs (`sharegpt-first-turn`, vLLM's
benchmark reading): mean ~760 vs ~108 tokens by the 4-characters-per-token estimate. The context filter is
applied by `limits.Limits` (max_seq_len), with the other limits.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

MIN_TURNS = 3
MIN_TOKENS = 4  # DistServe drops a pair only when both sides are shorter


def multi_turn_pairs(conversations: Sequence[tuple[str, ...]], rng: np.random.Generator) -> Iterator[tuple[str, str]]:
    """(prompt, output) texts from the conversations with >= MIN_TURNS turns, in a seeded random order."""
    eligible = [c for c in conversations if len(c) >= MIN_TURNS]
    for idx in rng.permutation(len(eligible)):
        turns = eligible[int(idx)]
        k = int(rng.integers(1, len(turns)))  # 1 .. n-1 inclusive
        yield "\n".join(turns[:k]), turns[k]


def is_too_short(input_len: int, output_len: int) -> bool:
    return input_len < MIN_TOKENS and output_len < MIN_TOKENS
