"""A request in flight, as the router's request path (`pipeline.py`) keeps it.

`generated` is the single list of tokens the client has received; every continuation (a retried prefill,
a decode leg moved to another instance) starts from it, which is why no token is repeated or lost.
"""

from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import dataclass, field

from router.dispatch import ServePath
from router.kv_release import OfferedKV
from router.states import RequestState
from trt_disagg.contract import InstanceInfo, SamplingParams


@dataclass
class Job:
    """A request in flight: what it asked for and what the client has received so far."""

    request_id: str
    prompt_ids: list[int]
    sampling: SamplingParams
    received_s: float  # monotonic
    deadline_s: float  # monotonic
    state: RequestState = RequestState.RECEIVED
    model: str = ""
    created: bool = False  # the record exists in Redis (written with the first dispatch)
    record_write: asyncio.Future[None] | None = None  # that first write, while in flight
    reaped: bool = False  # failed by the reaper; the generator must not go on
    path: ServePath | None = None
    generated: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    first_token_s: float | None = None
    last_token_s: float | None = None
    legs: dict[str, InstanceInfo] = field(default_factory=dict)  # role -> instance of the current leg
    unpulled_kv: OfferedKV | None = None  # prefill KV no decode leg has taken yet (released if none will)
    calls: dict[str, int] = field(default_factory=dict)  # role -> instance calls made (see call_id)
    stop: tuple[str, ...] = ()  # OpenAI `stop` strings, applied to the text (router/text.py)
    stopped_at_string: bool = False  # the text reached a stop string: the request ended normally

    @property
    def max_tokens(self) -> int:
        return self.sampling.max_new_tokens

    @property
    def remaining(self) -> int:
        return self.max_tokens - len(self.generated)

    def call_id(self, role: str) -> str:
        """The request id the next `role` call gives its instance: the request's own id first, then
        `<id>-<role initial><n>`. A retry or a continuation can land on an instance where an earlier call of
        this request is still being cleaned up (a prefill whose KV pull failed mid-way is freed only when the
        failure reaches the prefill side), and an engine refuses an id it still holds. Cancelling the
        request's id cancels them all (instance_client.TritonInstanceClient.cancel)."""
        n = self.calls.get(role, 0)
        self.calls[role] = n + 1
        return self.request_id if n == 0 else f"{self.request_id}-{role[0]}{n}"


def with_max(sampling: SamplingParams, max_new_tokens: int) -> SamplingParams:
    """The same sampling with another token budget (every other field carried over, new ones included)."""
    return dataclasses.replace(sampling, max_new_tokens=max_new_tokens)
