"""Live multi-turn conversations from the packaged ShareGPT data, for the conversation mode of the load
generator (trt_disagg.bench.conversation). The simulator's token-count view of the same idea is
`conversation_trace.py`.

    conversation = its user messages, in order, and each turn's answer budget (the recorded answer's
                   length, capped): the answer itself is whatever the server returns, and the next turn's
                   prompt is the previous prompt + that answer + the next user message (a chat message list)
    start times  = a Poisson process of conversations (exponential gaps at `rate` conversations/s)

Conversations are kept when they have at least `min_turns` user turns and their whole history (user
messages + answer budgets + a per-message allowance for the chat template) fits `max_prompt_tokens`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from trt_disagg.workload.types import estimate_tokens

TEMPLATE_TOKENS_PER_MESSAGE = 6  # role markers of a chat template (<|im_start|>user\n ... <|im_end|>\n)


@dataclass(frozen=True)
class Conversation:
    user_messages: tuple[str, ...]
    max_tokens: tuple[int, ...]  # per turn: the answer budget

    @property
    def num_turns(self) -> int:
        return len(self.user_messages)


def pick_conversations(conversations: Sequence[Sequence[str]], *, num: int, min_turns: int = 3,
                       max_turns: int | None = None, max_prompt_tokens: int, max_answer_tokens: int,
                       seed: int = 0, count: Callable[[str], int] = estimate_tokens) -> list[Conversation]:
    """`num` conversations (ShareGPT messages alternate user / assistant), shuffled by `seed`, that fit."""
    rng = np.random.default_rng(seed)
    picked: list[Conversation] = []
    for i in rng.permutation(len(conversations)):
        conv = _fit(conversations[int(i)], min_turns, max_turns, max_prompt_tokens, max_answer_tokens, count)
        if conv is not None:
            picked.append(conv)
            if len(picked) == num:
                return picked
    raise ValueError(f"only {len(picked)} conversations of >= {min_turns} turns fit {max_prompt_tokens} "
                     f"prompt tokens; asked for {num}")


def _fit(messages: Sequence[str], min_turns: int, max_turns: int | None, max_prompt_tokens: int,
         max_answer_tokens: int, count: Callable[[str], int]) -> Conversation | None:
    users = [m for m in messages[0::2]]
    answers = [m for m in messages[1::2]]
    n = min(len(users), len(answers) + 1, max_turns or len(users))
    if n < min_turns or any(not u.strip() for u in users[:n]):
        return None
    budgets = tuple(max(1, min(max_answer_tokens, count(a))) for a in answers[:n])
    if len(budgets) < n:
        budgets = budgets + (max_answer_tokens,)
    history = sum(count(u) for u in users[:n]) + sum(budgets[:n - 1]) + 2 * n * TEMPLATE_TOKENS_PER_MESSAGE
    if history + budgets[n - 1] > max_prompt_tokens:
        return None
    return Conversation(tuple(users[:n]), budgets[:n])


def conversation_starts(num: int, rate: float, seed: int = 0) -> np.ndarray:
    """Start times (s) of `num` conversations arriving as a Poisson process of `rate` per second."""
    if rate <= 0:
        raise ValueError(f"rate must be > 0 conversations/s, got {rate}")
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, size=num)
    return np.cumsum(gaps) - gaps[0]
