"""What a request must fit, and what happens to one that does not: dropped or truncated, and counted.

    limit on the prompt = min(max_input_len, max_seq_len - 1 - output_len)    (prompt + output < context,
                                                                              DistServe's ShareGPT filter)
    output over max_output_len, or prompt over its limit:
        drop       the request is left out (DistServe's and vLLM's benchmarks do this)
        truncate   the prompt (or output) is cut to its limit; a request with no room left is still dropped

`LimitCounter` tallies every decision by reason, so a plan can report how many requests a limit touched
instead of changing the workload silently.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from trt_disagg.errors import UserError

LONG_PROMPT_POLICIES = ("drop", "truncate")
DROP_LONG_OUTPUT = "output over max_output_len"
DROP_LONG_PROMPT = "prompt over the input limit"
DROP_OVER_CONTEXT = "prompt + output over the context"


@dataclass(frozen=True)
class Limits:
    max_seq_len: int | None = None  # the model's context: prompt + output must stay below it
    max_input_len: int | None = None
    max_output_len: int | None = None
    long_prompts: str = "drop"  # drop | truncate

    def __post_init__(self) -> None:
        if self.long_prompts not in LONG_PROMPT_POLICIES:
            raise UserError(f"--long-prompts: expected drop or truncate, got {self.long_prompts!r}")
        for name in ("max_seq_len", "max_input_len", "max_output_len"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UserError(f"{name} must be >= 1, got {value}")

    def prompt_limit(self, output_len: int) -> int | None:
        limits = [x for x in (self.max_input_len,
                              None if self.max_seq_len is None else self.max_seq_len - 1 - output_len) if x is not None]
        return min(limits) if limits else None


@dataclass(frozen=True)
class Fitted:
    input_len: int
    output_len: int


@dataclass
class LimitCounter:
    """Applies `Limits` to one request at a time and counts what it dropped or truncated."""

    limits: Limits
    dropped: dict[str, int] = field(default_factory=dict)
    truncated: int = 0

    def drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1

    def try_fit(self, input_len: int, output_len: int) -> Fitted | None:
        """The lengths that fit (cut when the policy is truncate), or None when the request is dropped."""
        lim, cut = self.limits, False
        if lim.max_output_len is not None and output_len > lim.max_output_len:
            if lim.long_prompts == "drop":
                self.drop(DROP_LONG_OUTPUT)
                return None
            output_len, cut = lim.max_output_len, True
        limit = lim.prompt_limit(output_len)
        if limit is not None and input_len > limit:
            over_context = lim.max_input_len is None or limit < lim.max_input_len
            if lim.long_prompts == "drop" or limit < 1:
                self.drop(DROP_OVER_CONTEXT if over_context else DROP_LONG_PROMPT)
                return None
            input_len, cut = limit, True
        self.truncated += cut
        return Fitted(input_len, output_len)
