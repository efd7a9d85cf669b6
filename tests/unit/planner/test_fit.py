"""Fitting recovers known coefficients from synthetic timings and reports its error honestly."""

from __future__ import annotations

import numpy as np
import pytest

from trt_disagg.errors import UserError
from trt_disagg.planner.fit import (
    DecodeSample,
    PrefillSample,
    fit_decode,
    fit_phase_coefficients,
    fit_prefill,
)
from trt_disagg.planner.latency_model import Coefficients

TRUE_PREFILL = Coefficients(0.0181, 1.0191e-4, 7.12e-9)
TRUE_SMALL = Coefficients(0.01993, 6.269e-7, 3.851e-5)
TRUE_LARGE = Coefficients(0.00717, 5.798e-7, 1.5831e-4)


def prefill_samples(noise: float = 0.0, seed: int = 0) -> list[PrefillSample]:
    rng = np.random.default_rng(seed)
    out = []
    for b in (1, 2, 4, 8):
        for n in (16, 128, 512, 1024):
            lengths = tuple(int(x) for x in rng.integers(n // 2, n + 1, b))
            t = TRUE_PREFILL(sum(lengths), sum(x * x for x in lengths))
            out.append(PrefillSample(lengths, t * (1 + noise * rng.standard_normal())))
    return out


def decode_samples(noise: float = 0.0) -> list[DecodeSample]:
    rng = np.random.default_rng(1)
    out = []
    for b in (1, 8, 32, 64, 95, 128, 192, 256):
        for ctx in (64, 512, 1500):
            coeffs = TRUE_SMALL if b <= 95 else TRUE_LARGE
            t = coeffs(b * ctx, b)
            out.append(DecodeSample(b, b * ctx, t * (1 + noise * rng.standard_normal())))
    return out


def test_noise_free_prefill_fit_recovers_the_coefficients():
    rep = fit_prefill(prefill_samples())
    assert rep.coefficients.a == pytest.approx(TRUE_PREFILL.a, rel=1e-6)
    assert rep.coefficients.b == pytest.approx(TRUE_PREFILL.b, rel=1e-6)
    assert rep.coefficients.c == pytest.approx(TRUE_PREFILL.c, rel=1e-4)
    assert rep.max_rel_error < 1e-9 and rep.num_samples == 16


def test_noisy_fit_stays_close_and_reports_its_error():
    rep = fit_prefill(prefill_samples(noise=0.02))
    assert rep.coefficients.a == pytest.approx(TRUE_PREFILL.a, rel=0.15)
    assert rep.coefficients.b == pytest.approx(TRUE_PREFILL.b, rel=0.1)
    assert 0.005 < rep.mean_rel_error < 0.05 and rep.max_rel_error >= rep.mean_rel_error


def test_decode_fit_splits_at_the_threshold():
    small, large = fit_decode(decode_samples(), threshold=95)
    for got, want in ((small.coefficients, TRUE_SMALL), (large.coefficients, TRUE_LARGE)):
        assert (got.a, got.b, got.c) == pytest.approx((want.a, want.b, want.c), rel=1e-5)


def test_decode_fit_falls_back_to_one_set_without_large_batches():
    samples = [s for s in decode_samples() if s.batch <= 95]
    small, large = fit_decode(samples, threshold=95)
    assert small == large
    coeffs, reports = fit_phase_coefficients(prefill_samples(), samples, 95)
    assert coeffs.decode_small == coeffs.decode_large and set(reports) == {"prefill", "decode_small", "decode_large"}


def test_too_few_or_bad_samples_are_user_errors():
    with pytest.raises(UserError, match="at least 3"):
        fit_prefill(prefill_samples()[:2])
    with pytest.raises(UserError, match="> 0"):
        fit_prefill([PrefillSample((1,), 0.0)] * 3)
