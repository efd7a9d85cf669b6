"""The profiler's loop against a fake engine whose step times follow known coefficients (fake clock)."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from types import SimpleNamespace

import pytest

from trt_disagg.contract import RequestType, SamplingParams
from trt_disagg.errors import UserError
from trt_disagg.planner.latency_model import Coefficients, LatencyModel
from trt_disagg.planner.profile import ProfileGrid, fit_profile, grid_points, profile_engine, write_profile

PREFILL = Coefficients(0.004, 2e-5, 1e-8)
DECODE = Coefficients(0.003, 1e-6, 5e-4)


@dataclass
class Event:
    request_id: str
    token_id: int
    finish_reason: str | None


class FakeEngine:
    """Shape of LLMEngine: prefills every waiting request in one step, else one decode step for all running."""

    def __init__(self, max_batch=16, max_input_len=512, max_num_tokens=4096, max_seq_len=1024):
        self.config = SimpleNamespace(limits=SimpleNamespace(max_batch_size=max_batch, max_input_len=max_input_len,
                                                             max_num_tokens=max_num_tokens, max_seq_len=max_seq_len),
                                      shape=SimpleNamespace(vocab_size=1000), tp=2, pp=1)
        self.now = 0.0
        self.waiting: dict[str, tuple[int, RequestType, int]] = {}
        self.running: dict[str, list[int]] = {}  # id -> [context, remaining]
        self.kept_kv: set[str] = set()

    def clock(self) -> float:
        return self.now

    def add_request(self, request_id, prompt_ids, sampling: SamplingParams,
                    request_type=RequestType.CONTEXT_AND_GENERATION):
        assert all(100 <= t < 1000 for t in prompt_ids)
        self.waiting[request_id] = (len(prompt_ids), request_type, sampling.max_new_tokens)

    def step(self):
        events = []
        if self.waiting:
            lengths = [n for n, _, _ in self.waiting.values()]
            self.now += PREFILL(sum(lengths), sum(n * n for n in lengths))
            for rid, (n, kind, max_new) in self.waiting.items():
                if kind is RequestType.CONTEXT_ONLY:
                    self.kept_kv.add(rid)
                    events.append(Event(rid, 1, "prefill_done"))
                else:
                    self.running[rid] = [n + 1, max_new - 1]
                    events.append(Event(rid, 1, None))
            self.waiting.clear()
        elif self.running:
            self.now += DECODE(sum(c for c, _ in self.running.values()), len(self.running))
            for rid, state in list(self.running.items()):
                state[0] += 1
                state[1] -= 1
                events.append(Event(rid, 2, "length" if state[1] == 0 else None))
                if state[1] == 0:
                    del self.running[rid]
        return events

    def has_unfinished(self):
        return bool(self.waiting or self.running)

    def abort(self, request_id):
        self.waiting.pop(request_id, None)
        self.running.pop(request_id, None)

    def release_kv(self, request_id):
        self.kept_kv.discard(request_id)


def test_profile_of_a_fake_engine_fits_its_coefficients(tmp_path):
    engine = FakeEngine()
    grid = ProfileGrid(batch_sizes=(1, 2, 4, 8), prompt_lens=(16, 64, 256), repeats=2, warmup=1, decode_steps=3)
    calls = []
    data = profile_engine(engine, grid, lambda done, total: calls.append((done, total)), clock=engine.clock)
    assert calls[-1] == (12 * 3, 12 * 3)
    assert len(data.prefill) == 12 * 2 and len(data.decode) == 12 * 2 * 3
    assert not engine.has_unfinished() and not engine.kept_kv  # nothing left behind
    fit = fit_profile(data, tp=2, model="fake", device="cpu", source="profile:test")
    got = fit.latency_model.for_tp(2)
    assert (got.prefill.a, got.prefill.b, got.prefill.c) == pytest.approx((PREFILL.a, PREFILL.b, PREFILL.c), rel=1e-4)
    assert (got.decode_small.a, got.decode_small.b, got.decode_small.c) == pytest.approx(
        (DECODE.a, DECODE.b, DECODE.c), rel=1e-4)
    assert fit.reports["prefill"].max_rel_error < 1e-6

    write_profile(tmp_path, data, fit, grid, "engines/fake/colocated")
    rows = list(csv.DictReader((tmp_path / "profile.csv").open()))
    assert len(rows) == len(data.prefill) + len(data.decode)
    saved = json.loads((tmp_path / "profile.json").read_text())
    assert saved["fit"]["prefill"]["num_samples"] == 12  # one median per grid point
    assert LatencyModel.from_json(tmp_path / "profile.json").for_tp(2) == got


def test_grid_respects_the_engine_limits():
    grid = ProfileGrid(batch_sizes=(1, 4, 32), prompt_lens=(100, 600), decode_steps=2)
    assert grid_points(grid, max_batch=16, max_input_len=512, max_num_tokens=1024, max_seq_len=2048) == [
        (1, 100), (4, 100)]
    with pytest.raises(UserError, match="no grid point fits"):
        profile_engine(FakeEngine(max_input_len=8), ProfileGrid(prompt_lens=(16,)))


def test_bad_grids_are_user_errors():
    with pytest.raises(UserError, match="--batch-sizes"):
        ProfileGrid(batch_sizes=())
    with pytest.raises(UserError, match="--repeats"):
        ProfileGrid(repeats=0)


def test_fit_splits_decode_where_the_step_time_bends():
    """A CPU decode step bends at small batches (GEMM kernel switch): the fit picks the split that fits."""
    from trt_disagg.planner.fit import DecodeSample, PrefillSample
    from trt_disagg.planner.profile import ProfileData

    small, large = Coefficients(0.050, 2e-5, 0.006), Coefficients(0.080, 2e-5, 0.008)
    decode = [DecodeSample(b, b * ctx, (small if b <= 2 else large)(b * ctx, b))
              for b in (1, 2, 3, 4, 6, 8) for ctx in (64, 256, 512)]
    prefill = [PrefillSample((n,), PREFILL(n, n * n)) for n in (16, 64, 256)]
    fit = fit_profile(ProfileData(prefill, decode), tp=1, model="fake", device="cpu", source="test")
    got = fit.latency_model.for_tp(1)
    assert got.decode_threshold == 2
    assert fit.reports["decode_small"].max_rel_error < 1e-6 and fit.reports["decode_large"].max_rel_error < 1e-6
    forced = fit_profile(ProfileData(prefill, decode), tp=1, model="fake", device="cpu", source="test",
                         decode_threshold=1 << 30)
    assert forced.reports["decode_small"].max_rel_error > 0.05  # one line through the bend misses
