"""What the simulator simulates: instance specs, the cluster shape, and the workload as arrays."""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np

from trt_disagg.planner.latency_model import InstanceTiming


@dataclass(frozen=True)
class InstanceSpec:
    timing: InstanceTiming
    kv_capacity_tokens: int  # of the whole instance (all its GPUs)
    max_batch_size: int = 1 << 20  # prefill: requests per batch; decode/colocated: running sequences
    max_num_tokens: int = 2048  # prefill token budget per batch (chunked: per iteration)

    @property
    def pp(self) -> int:
        return self.timing.pp


@dataclass(frozen=True)
class DisaggSpec:
    """num_prefill x prefill instances feed num_decode x decode instances, each prefill instance over its own
    link of kv_link_bytes_per_s that sends a batch's KV one request after another (instances.KVLinks)."""

    prefill: InstanceSpec
    decode: InstanceSpec
    num_prefill: int
    num_decode: int
    kv_bytes_per_token: int
    kv_link_bytes_per_s: float
    # What a hand-off costs besides the bytes on the link (0 for the planner's GPU clusters, where the
    # transfer engine copies asynchronously; measured for the CPU reference engine by `trt-disagg demo`):
    handoff_s: float = 0.0  # fixed latency per request: decode dispatch, pull set-up, responses
    import_s_per_token: float = 0.0  # decode engine time writing the pulled KV into its pool (stalls a step)
    # Instances that share a host's memory bandwidth slow each other: a decode step of batch b that starts
    # while a prefill instance runs a batch takes decode_beside_prefill[b - 1] times its model time (the last
    # factor for larger batches; empty: no interference, the planner's GPU clusters; measured from the
    # served steps by `trt-disagg demo` on a CPU host). The conversation loop (prefix reuse, closed-loop
    # turns) does not model it.
    decode_beside_prefill: tuple[float, ...] = ()


class ColocatedPolicy(enum.StrEnum):
    """How a colocated engine mixes the two phases: the names the planner, the simulator and the CLI accept.

    Each member has a lane class in `instances.COLOCATED_LANES`; adding a policy is one member and one lane.
    """

    PREFILL_FIRST = "prefill-first"  # vLLM: a waiting prompt runs as a prefill batch before the next decode step
    CHUNKED = "chunked"  # Sarathi: prompt chunks ride along every decode step, up to the token budget


@dataclass(frozen=True)
class ColocatedSpec:
    """num_instances engines that each run both phases; policy: prefill-first (vLLM) or chunked (Sarathi)."""

    instance: InstanceSpec
    num_instances: int
    policy: ColocatedPolicy = ColocatedPolicy.PREFILL_FIRST

    def __post_init__(self) -> None:
        # Accept the policy's name too (a config value, a flag), and refuse an unknown one here, not mid-run.
        object.__setattr__(self, "policy", ColocatedPolicy(self.policy))


@dataclass(frozen=True)
class ConversationLinks:
    """Which requests are turns of one conversation: what prefix reuse and closed-loop arrivals need.

    Request i's first `shared_prefix_len[i]` prompt tokens are the prompt + answer of request `previous[i]`
    (-1: a first turn, nothing shared). `closed_loop`: a later turn arrives `think_s[i]` after its previous
    turn finished (its `arrival_s` is ignored); else every `arrival_s` is a fixed send time (a replayed trace).
    Every prompt's first `common_prefix_len` tokens are the same across conversations (a chat template's
    default system prompt), so its whole blocks are cached once per instance for every conversation.
    """

    previous: np.ndarray  # int64
    shared_prefix_len: np.ndarray  # int64
    think_s: np.ndarray  # float64
    closed_loop: bool = True
    common_prefix_len: int = 0


class Routing(enum.StrEnum):
    """How a request picks its decode-capable instance when prefixes are cached (`routing.make_router`)."""

    LEAST_LOADED = "least_loaded"  # the router's: fewest sequences, then most free KV; ties take turns
    KV_AWARE = "kv_aware"  # unmatched prompt tokens x overlap_weight + load: cached prefix against load


@dataclass(frozen=True)
class PrefixReuse:
    """Block reuse on every decode-capable instance (TensorRT-LLM's enable_block_reuse), as the simulator
    models it (`prefix_cache.py`). `enabled=False` is the simulator without a cache (and without the cost
    of modelling one)."""

    enabled: bool = True
    tokens_per_block: int = 16
    routing: Routing = Routing.LEAST_LOADED
    overlap_weight: float = 1.0  # kv_aware: one unmatched prompt token costs this many tokens of load
    # Conditional disaggregation: a prompt whose unmatched suffix on the chosen decode instance is at most this
    # many tokens is prefilled there, skipping the prefill instance and the KV transfer (0: never).
    local_prefill_max_tokens: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "routing", Routing(self.routing))
        if self.tokens_per_block < 1:
            raise ValueError(f"tokens_per_block must be >= 1, got {self.tokens_per_block}")
        if self.overlap_weight < 0 or self.local_prefill_max_tokens < 0:
            raise ValueError("overlap_weight and local_prefill_max_tokens must be >= 0")


@dataclass(frozen=True)
class SimWorkload:
    arrival_s: np.ndarray  # float64, sorted (closed-loop conversations: first turns sorted, later ones ignored)
    input_len: np.ndarray  # int64
    output_len: np.ndarray  # int64 (>= 1; the first token comes from prefill)
    conversations: ConversationLinks | None = None  # None: independent requests

    def __post_init__(self) -> None:
        n = len(self.arrival_s)
        if len(self.input_len) != n or len(self.output_len) != n:
            raise ValueError("arrival_s, input_len and output_len must have the same length")
        if n and (self.input_len.min() < 1 or self.output_len.min() < 1):
            raise ValueError("input_len and output_len must be >= 1")
        links = self.conversations
        if links is not None and not (len(links.previous) == len(links.shared_prefix_len) == len(links.think_s) == n):
            raise ValueError("conversation links must have one entry per request")

    def __len__(self) -> int:
        return len(self.arrival_s)

    @classmethod
    def from_lengths(cls, arrival_s, input_len, output_len) -> SimWorkload:
        return cls(np.asarray(arrival_s, dtype=np.float64), np.asarray(input_len, dtype=np.int64),
                   np.asarray(output_len, dtype=np.int64))
