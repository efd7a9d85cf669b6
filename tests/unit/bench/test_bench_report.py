"""Report files: JSON and CSV carry the hand-computed metrics; the PNGs are real images; tables render."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from rich.console import Console

from tests.unit.bench.bench_support import hand_records, make_record, make_run
from trt_disagg.bench.goodput import GoodputResult
from trt_disagg.bench.report import render_goodput_table, render_table, write_report
from trt_disagg.config import SLO

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _runs(slo: SLO) -> list:
    fast = [make_record([0.1, 0.2, 0.3], index=i, end_s=0.35) for i in range(6)]
    return [make_run(2.0, hand_records(), slo), make_run(1.0, fast, slo, duration_s=6.0)]


def test_write_report_single_series(tmp_path: Path, slo: SLO) -> None:
    paths = write_report(_runs(slo), tmp_path / "out")
    names = sorted(p.name for p in paths)
    assert names == ["attainment_vs_rate.png", "requests.csv", "runs.csv", "summary.json", "tpot_cdf.png",
                     "ttft_cdf.png"]
    for p in paths:
        assert p.is_file() and p.parent == tmp_path / "out"
        if p.suffix == ".png":
            assert p.read_bytes()[:8] == PNG_MAGIC

    doc = json.loads((tmp_path / "out" / "summary.json").read_text())
    runs = doc["series"]["run"]["runs"]
    assert [r["rate_rps"] for r in runs] == [1.0, 2.0]  # sorted by rate
    assert runs[1]["attainment"] == pytest.approx(1 / 3)
    assert runs[1]["ttft_s"]["p90"] == pytest.approx(2.4)
    assert runs[0]["attainment"] == 1.0
    assert doc["series"]["run"]["slo"] == {"ttft_s": 1.0, "tpot_s": 0.21, "attainment": 0.9}
    assert doc["series"]["run"]["goodput"] is None

    with (tmp_path / "out" / "requests.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 12
    hand = [r for r in rows if float(r["rate_rps"]) == 2.0]
    assert [r["attained"] for r in hand] == ["1", "1", "0", "0", "0", "0"]
    assert hand[2]["error"] == "HTTP 500: engine exploded" and hand[2]["ttft_s"] == ""
    assert hand[1]["tpot_s"] == ""  # one output token: TPOT undefined, not 0
    assert float(hand[0]["tpot_s"]) == pytest.approx(0.2)

    with (tmp_path / "out" / "runs.csv").open() as f:
        run_rows = list(csv.DictReader(f))
    assert [float(r["attainment"]) for r in run_rows] == pytest.approx([1.0, 1 / 3])
    assert float(run_rows[1]["tpot_s_mean"]) == pytest.approx(0.225)


def test_write_report_two_series_with_goodput(tmp_path: Path, slo: SLO) -> None:
    disagg = GoodputResult(target=0.9, goodput_rps=1.0, num_cores=2, runs=_runs(slo))
    colocated = _runs(slo)[:1]
    write_report({"disaggregated": disagg, "colocated": colocated}, tmp_path)
    doc = json.loads((tmp_path / "summary.json").read_text())
    assert set(doc["series"]) == {"disaggregated", "colocated"}
    assert doc["series"]["disaggregated"]["goodput"]["per_core_goodput_rps"] == 0.5
    assert len(doc["series"]["colocated"]["runs"]) == 1

    console = Console(record=True, width=200)
    console.print(render_table({"disaggregated": disagg, "colocated": colocated}))
    table = render_goodput_table({"disaggregated": disagg, "colocated": colocated})
    assert table is not None
    console.print(table)
    text = console.export_text()
    assert "disaggregated" in text and "colocated" in text
    assert "33.3" in text  # attainment of the hand-computed run, in %
    assert render_goodput_table(colocated) is None


def test_goodput_table_ratio_against_a_baseline(slo: SLO) -> None:
    disagg = GoodputResult(target=0.9, goodput_rps=3.0, num_cores=2, runs=_runs(slo))
    colocated = GoodputResult(target=0.9, goodput_rps=2.0, num_cores=2, runs=_runs(slo))
    none = GoodputResult(target=0.9, goodput_rps=0.0, num_cores=2, runs=_runs(slo))
    table = render_goodput_table({"disaggregated": disagg, "colocated": colocated}, baseline="colocated")
    console = Console(record=True, width=200)
    console.print(table)
    text = console.export_text()
    assert "vs colocated" in text and "1.50x" in text and "1.00x" in text
    console.print(render_goodput_table({"disaggregated": disagg, "colocated": none}, baseline="colocated"))
    assert "1.50x" not in console.export_text()  # baseline goodput 0: no ratio
    with pytest.raises(ValueError, match="baseline"):
        render_goodput_table({"disaggregated": disagg}, baseline="colocated")
