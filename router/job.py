"""A request in flight, as the router's request path (`pipeline.py`) keeps it, and how a request ends.

`generated` is the single list of tokens the client has received; every continuation (a retried prefill,
a decode leg moved to another instance) starts from it, which is why no token is repeated or lost.
A `Job` holds no flags: where the request is lives in its record (`job.state`, written only by
`RequestRecordWriter`), what it holds on the instances lives in its `Legs`, and whether it is complete is
a counter (`remaining`) or its `finish_reason`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from router.dispatch import ServePath
from router.legs import Legs
from router.record_writer import RequestRecordWriter
from router.states import RequestState
from trt_disagg.contract import SamplingParams


@dataclass
class Job:
    """A request in flight: what it asked for, what the client has received so far, what it holds."""

    request_id: str
    prompt_ids: list[int]
    sampling: SamplingParams
    received_s: float  # monotonic
    deadline_s: float  # monotonic
    record: RequestRecordWriter  # the only writer of the request's state (memory and Redis)
    legs: Legs  # its open instance calls and its un-pulled prefill KV
    model: str = ""
    stop: tuple[str, ...] = ()  # OpenAI `stop` strings, applied to the text (router/text.py)
    # how many times the client says it sent this before (router/admission.py: a retry takes the place it was
    # given, a client that says nothing takes none); None: it does not say
    retry_count: int | None = None
    path: ServePath | None = None
    generated: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    first_token_s: float | None = None
    last_token_s: float | None = None

    @property
    def state(self) -> RequestState:
        return self.record.state

    @property
    def max_tokens(self) -> int:
        return self.sampling.max_new_tokens

    @property
    def remaining(self) -> int:
        return self.max_tokens - len(self.generated)

    @property
    def complete(self) -> bool:
        """Every token the request will get has been generated (its budget, or an end token)."""
        return self.finish_reason is not None or self.remaining <= 0


def with_max(sampling: SamplingParams, max_new_tokens: int) -> SamplingParams:
    """The same sampling with another token budget (every other field carried over, new ones included)."""
    return dataclasses.replace(sampling, max_new_tokens=max_new_tokens)
