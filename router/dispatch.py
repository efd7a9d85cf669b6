"""Where each request goes: prefill to the shortest queue, decode to the least loaded, or colocated.

    Redis ──refresh() every refresh_interval_s──▶ snapshot: live instances + their published load
      trtd:role:<role>, trtd:instance:<id>, trtd:load:<id>        (written by the instances; trt_disagg.keys)
      trtd:drain:<id>                                             (written by /admin: take no new work)
      trtd:router_inflight:<router_id>  HASH instance -> outstanding work this router sent there,
                                        "#prefilled:<role>" -> prompt tokens it saw prefilled there, all time,
                                        "#paced:<role>" -> until when (wall clock) the clients it refused
                                        there hold places (router/admission.py)
    pick(role) = policy.choose(candidates)                        (in memory, no Redis round trip)

The load of an instance is what it published (queued prompt tokens, running sequences, free KV blocks)
and what the routers have outstanding on it: every router publishes its own outstanding counts at each
refresh and reads the others', so several routers agree without a Redis call on the request path. Each
figure is a lower bound of the truth (the instance's is a moment old, a router's misses the others' last
refresh), so a policy takes the larger of the two. The prefilled counts let each router's admission
(router/admission.py) tell which part of a pool's completions it sees: its own are only its share; the
paced times let it place the clients it refuses behind those the others refused.

Policies are chosen by name from `POLICIES` (least_loaded, round_robin, kv_aware: router/kv_routing.py); adding one is one class and one
line. Conditional disaggregation: `choose_path` sends prompts shorter than the threshold (or every prompt,
when no prefill+decode pair is up) to a colocated instance.
"""

from __future__ import annotations

import enum
import itertools
import json
import logging
import time
from collections import defaultdict, deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

from router.kv_routing import KVAware, KVRouting
from trt_disagg.contract import InstanceInfo, InstanceLoad, Role, decode_load
from trt_disagg.keys import ROUTERS_KEY, as_text, drain_key, load_key, router_inflight_key
from trt_disagg.registry_read import list_instances

log = logging.getLogger(__name__)

PREFILLED_FIELD = "#prefilled:"  # + role: a field of a router's inflight hash no instance id can take
PACED_FIELD = "#paced:"  # + role: until when (time.time()) this router's refused clients hold places there
PEER_PREFILLED_KEPT_S = 120.0  # how far back the peers' prefilled counts are kept (admission's window is less)


class ServePath(enum.StrEnum):
    DISAGGREGATED = "disaggregated"
    COLOCATED = "colocated"
    LOCAL = "local"  # kv_aware: a decode/colocated instance holding the prefix prefills the short suffix


@dataclass
class Outstanding:
    """Work sent to an instance and not finished yet."""

    prompt_tokens: int = 0
    sequences: int = 0


@dataclass(frozen=True, slots=True)
class PeerPrefills:
    """What the other routers saw prefilled on a pool over a stretch of time: their pace there."""

    tokens: int
    covered_s: float  # the time those tokens were counted over (0: no count read yet)


@dataclass(frozen=True)
class Candidate:
    """An instance as a policy sees it: identity, published load, and what all routers have outstanding."""

    info: InstanceInfo
    load: InstanceLoad
    outstanding: Outstanding
    prompt_tokens: int = 0  # kv_aware: the request's prompt (0: the policy was not told)
    matched_tokens: int = 0  # kv_aware: leading prompt tokens this instance holds in its prefix cache

    @property
    def queued_prompt_tokens(self) -> int:
        return max(self.load.queued_prompt_tokens, self.outstanding.prompt_tokens)

    @property
    def running_sequences(self) -> int:
        return max(self.load.running_sequences, self.outstanding.sequences)


class DispatchPolicy(Protocol):
    def choose(self, role: Role, candidates: Sequence[Candidate]) -> Candidate | None: ...


class LeastLoaded:
    """Prefill: fewest outstanding prompt tokens. Decode/colocated: fewest sequences, then most free KV
    (in tenths of the pool: a few blocks' difference is noise, not pressure).

    Instances that tie take turns. Breaking ties by id (or by a block or two of free KV) would send every
    request to the same instance whenever requests do not overlap (each one finishes before the next is
    placed: light load, or a fast engine), so one instance would take all the work while its peers idle."""

    def __init__(self) -> None:
        self._turns: dict[Role, Iterator[int]] = defaultdict(itertools.count)

    @staticmethod
    def load_key(role: Role, c: Candidate) -> tuple[int, ...]:
        if role is Role.PREFILL:
            return (c.queued_prompt_tokens,)
        total = c.load.total_kv_blocks
        free_tenths = 10 * c.load.free_kv_blocks // total if total > 0 else 0
        return (c.running_sequences, -free_tenths)

    def choose(self, role: Role, candidates: Sequence[Candidate]) -> Candidate | None:
        if not candidates:
            return None
        keyed = [(self.load_key(role, c), c) for c in candidates]
        least = min(key for key, _ in keyed)
        tied = sorted((c for key, c in keyed if key == least), key=lambda c: c.info.instance_id)
        return tied[next(self._turns[role]) % len(tied)]


class RoundRobin:
    """Each role's instances in turn, by id."""

    def __init__(self) -> None:
        self._counters: dict[Role, Iterator[int]] = defaultdict(itertools.count)

    def choose(self, role: Role, candidates: Sequence[Candidate]) -> Candidate | None:
        if not candidates:
            return None
        ordered = sorted(candidates, key=lambda c: c.info.instance_id)
        return ordered[next(self._counters[role]) % len(ordered)]


POLICIES: dict[str, type[DispatchPolicy]] = {"least_loaded": LeastLoaded, "round_robin": RoundRobin,
                                             "kv_aware": KVAware}


def make_policy(name: str, **options: float) -> DispatchPolicy:
    """The policy `name`, built with `options` (its weights: only kv_aware has any)."""
    try:
        cls = POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown dispatch policy {name!r}; known: {', '.join(sorted(POLICIES))}") from None
    return cls(**options) if options else cls()  # type: ignore[call-arg]


@dataclass
class InstanceView:
    info: InstanceInfo
    load: InstanceLoad
    draining: bool


@dataclass
class Snapshot:
    """The deployment as last read from Redis."""

    instances: dict[Role, list[InstanceView]] = field(default_factory=dict)
    others_outstanding: dict[str, Outstanding] = field(default_factory=dict)

    def live(self, role: Role) -> list[InstanceView]:
        return [v for v in self.instances.get(role, []) if not v.draining]


class Dispatcher:
    def __init__(self, redis: Any, router_id: str, policy: DispatchPolicy, *, colocated_threshold_tokens: int,
                 max_queued_prompt_tokens: int, publish_ttl_s: float) -> None:
        self._redis = redis
        self.router_id = router_id
        self.policy = policy
        self._threshold = colocated_threshold_tokens
        self._max_queued_prompt_tokens = max_queued_prompt_tokens
        self._publish_ttl_ms = max(1, int(publish_ttl_s * 1000))
        self._mine: dict[str, Outstanding] = defaultdict(Outstanding)
        self._prefilled: dict[Role, int] = defaultdict(int)  # prompt tokens this router saw prefilled, all time
        self._peer_prefilled: dict[tuple[str, Role], int] = {}  # each peer's count as last read
        # per pool, what the peers prefilled since the read before: (monotonic time of the read, tokens)
        self._peer_increments: dict[Role, deque[tuple[float, int]]] = defaultdict(deque)
        # per pool, the first read that found a peer's count there: the increments cover the time since then
        self._peers_counted_since: dict[Role, float] = {}
        self._last_peer_read_s: float | None = None  # the latest read of the peers' counts (monotonic)
        self._paced_until: dict[Role, float] = {}  # published: until when (wall clock) our refused clients wait
        self._peer_paced_until: dict[Role, list[float]] = {}  # the peers' as last read
        self.kv: KVRouting | None = None  # the block index (router.kv_routing), set when policy is kv_aware
        self._last_seen_s: dict[str, float] = {}  # instance id -> monotonic time of the last refresh listing it
        self.snapshot = Snapshot()

    # ---- reading and publishing the shared view ----------------------------------------------------

    async def refresh(self) -> Snapshot:
        """Re-read instances, loads and drain marks; publish our outstanding work, read the others'."""
        now = time.time()
        instances: dict[Role, list[InstanceView]] = {}
        for role in Role:
            infos = await list_instances(self._redis, role)
            if not infos:
                instances[role] = []
                continue
            pipe = self._redis.pipeline(transaction=False)
            pipe.mget([load_key(i.instance_id) for i in infos])
            pipe.mget([drain_key(i.instance_id) for i in infos])
            loads, drains = await pipe.execute()
            instances[role] = [InstanceView(info, decode_load(raw) if raw is not None else InstanceLoad(),
                                            drain is not None)
                               for info, raw, drain in zip(infos, loads, drains, strict=True)]
        others = await self._exchange_outstanding(now)
        self.snapshot = Snapshot(instances, others)
        seen_s = time.monotonic()
        for views in instances.values():
            for v in views:
                self._last_seen_s[v.info.instance_id] = seen_s
        return self.snapshot

    def lost_instances(self, after_s: float) -> list[str]:
        """Instances missing from the registry for more than `after_s` since they were last seen, each
        reported once: their heartbeat expired (crashed, hung, partitioned) or an admin removed them. A
        Redis restart empties the registry only until the next heartbeats, shorter than `after_s`."""
        now = time.monotonic()
        lost = [i for i, seen_s in self._last_seen_s.items() if now - seen_s > after_s]
        for instance_id in lost:
            del self._last_seen_s[instance_id]
        return lost

    def count_prefilled(self, role: Role, prompt_tokens: int) -> None:
        """A prefill this router sent to `role`'s pool finished: published with its outstanding work."""
        self._prefilled[role] += prompt_tokens

    def others_prefilled(self, role: Role, since_s: float) -> PeerPrefills:
        """Prompt tokens the other routers saw prefilled on `role`'s pool since `since_s` (monotonic), as
        far as their last published counts tell (one refresh interval late at most), and the seconds that
        covers: from `since_s`, or from this router's first read of a count there when that is later (a
        router that just started knows nothing of the time before it). Read newest first, so a check (on
        every request) touches only the reads within its window."""
        tokens = 0
        for at_s, n in reversed(self._peer_increments[role]):
            if at_s < since_s:
                break
            tokens += n
        first_s, last_s = self._peers_counted_since.get(role), self._last_peer_read_s
        covered_s = 0.0 if first_s is None or last_s is None else max(0.0, last_s - max(since_s, first_s))
        return PeerPrefills(tokens, covered_s)

    def publish_paced(self, role: Role, remaining_s: float) -> None:
        """The clients this router refused on `role`'s pool hold places for `remaining_s` more seconds:
        published at the next refresh (as a wall-clock time: the routers may be on different hosts)."""
        self._paced_until[role] = time.time() + remaining_s

    def others_paced_s(self, role: Role) -> float:
        """Seconds of places the other routers' refused clients still hold on `role`'s pool, together (as of
        their last published times)."""
        now = time.time()
        return sum(max(0.0, until - now) for until in self._peer_paced_until.get(role, ()))

    def _peer_prefilled_increment(self, peer: str, role: Role, count: int) -> int:
        """How much `peer`'s prefilled count on `role` grew since the last read (0 the first time, and after the
        peer restarted: it counts from 0 again)."""
        before = self._peer_prefilled.get((peer, role))
        self._peer_prefilled[(peer, role)] = count
        return count - before if before is not None and count > before else 0

    async def _exchange_outstanding(self, now: float) -> dict[str, Outstanding]:
        mine = {k: json.dumps([v.prompt_tokens, v.sequences]) for k, v in self._mine.items()
                if v.prompt_tokens or v.sequences}
        mine.update({f"{PREFILLED_FIELD}{role.value}": str(n) for role, n in self._prefilled.items()})
        mine.update({f"{PACED_FIELD}{role.value}": f"{until:.3f}" for role, until in self._paced_until.items()
                     if until > now})
        key = router_inflight_key(self.router_id)
        pipe = self._redis.pipeline(transaction=True)
        pipe.delete(key)
        if mine:
            pipe.hset(key, mapping=mine)
            pipe.pexpire(key, self._publish_ttl_ms)
        pipe.zadd(ROUTERS_KEY, {self.router_id: now})
        pipe.zremrangebyscore(ROUTERS_KEY, "-inf", now - 3600)
        pipe.zrangebyscore(ROUTERS_KEY, now - self._publish_ttl_ms / 1000, "+inf")
        routers = (await pipe.execute())[-1]
        others: dict[str, Outstanding] = defaultdict(Outstanding)
        peers = [as_text(r) for r in routers if as_text(r) != self.router_id]
        if not peers:
            self._peer_paced_until = {}
            return others
        pipe = self._redis.pipeline(transaction=False)
        for peer in peers:
            pipe.hgetall(router_inflight_key(peer))
        read_s = time.monotonic()
        prefilled: dict[Role, int] = defaultdict(int)
        paced: dict[Role, list[float]] = defaultdict(list)
        for peer, table in zip(peers, await pipe.execute(), strict=True):
            for name, raw in ((as_text(k), v) for k, v in table.items()):
                if name.startswith(PACED_FIELD):
                    paced[Role(name[len(PACED_FIELD):])].append(float(raw))
                    continue
                if name.startswith(PREFILLED_FIELD):
                    role = Role(name[len(PREFILLED_FIELD):])
                    prefilled[role] += self._peer_prefilled_increment(peer, role, int(raw))
                    continue
                prompt_tokens, sequences = json.loads(raw)
                o = others[name]
                o.prompt_tokens += int(prompt_tokens)
                o.sequences += int(sequences)
        for increments in self._peer_increments.values():
            while increments and increments[0][0] < read_s - PEER_PREFILLED_KEPT_S:
                increments.popleft()
        for role, tokens in prefilled.items():
            self._peers_counted_since.setdefault(role, read_s)
            if tokens:
                self._peer_increments[role].append((read_s, tokens))
        self._last_peer_read_s = read_s
        self._peer_paced_until = dict(paced)
        return others

    async def withdraw(self) -> None:
        """Stop advertising outstanding work (router shutting down)."""
        await self._redis.delete(router_inflight_key(self.router_id))
        await self._redis.zrem(ROUTERS_KEY, self.router_id)

    # ---- choosing -----------------------------------------------------------------------------------

    def can_serve(self) -> bool:
        """A prefill+decode pair or a colocated instance is up and not draining."""
        s = self.snapshot
        return bool(s.live(Role.PREFILL) and s.live(Role.DECODE)) or bool(s.live(Role.COLOCATED))

    def choose_path(self, prompt_tokens: int) -> ServePath | None:
        s = self.snapshot
        has_pair = bool(s.live(Role.PREFILL) and s.live(Role.DECODE))
        has_colocated = bool(s.live(Role.COLOCATED))
        if has_colocated and (not has_pair or prompt_tokens < self._threshold):
            return ServePath.COLOCATED
        if has_pair:
            return ServePath.DISAGGREGATED
        return None

    def outstanding(self, instance_id: str) -> Outstanding:
        mine = self._mine.get(instance_id, Outstanding())
        theirs = self.snapshot.others_outstanding.get(instance_id, Outstanding())
        return Outstanding(mine.prompt_tokens + theirs.prompt_tokens, mine.sequences + theirs.sequences)

    def candidates(self, role: Role, exclude: frozenset[str] = frozenset()) -> list[Candidate]:
        return [Candidate(v.info, v.load, self.outstanding(v.info.instance_id))
                for v in self.snapshot.live(role) if v.info.instance_id not in exclude]

    def pick(self, role: Role, exclude: frozenset[str] = frozenset(),
             prompt_ids: Sequence[int] = ()) -> InstanceInfo | None:
        """The instance for the next leg of `role`, or None when none is live (and not excluded).
        With `prompt_ids` and a block index (`kv`), each candidate carries its prefix overlap."""
        cands = self.candidates(role, exclude)
        if prompt_ids and self.kv is not None and self.kv.route_by_overlap:
            cands = self.kv.annotate(cands, prompt_ids)
        if role is Role.PREFILL:
            cands = [c for c in cands if c.queued_prompt_tokens < self._max_queued_prompt_tokens]
        chosen = self.policy.choose(role, cands)
        return None if chosen is None else chosen.info

    def saturated(self, role: Role) -> bool:
        """Every live instance of `role` has a full queue (the answer is 429, not 503)."""
        cands = self.candidates(role)
        return bool(cands) and role is Role.PREFILL and all(
            c.queued_prompt_tokens >= self._max_queued_prompt_tokens for c in cands)

    @contextmanager
    def lease(self, instance_id: str, *, prompt_tokens: int = 0, sequences: int = 0) -> Iterator[None]:
        """Count work as outstanding on `instance_id` for as long as the block runs."""
        o = self._mine[instance_id]
        o.prompt_tokens += prompt_tokens
        o.sequences += sequences
        try:
            yield
        finally:
            o.prompt_tokens -= prompt_tokens
            o.sequences -= sequences

    def instance(self, instance_id: str) -> InstanceView | None:
        for views in self.snapshot.instances.values():
            for v in views:
                if v.info.instance_id == instance_id:
                    return v
        return None
