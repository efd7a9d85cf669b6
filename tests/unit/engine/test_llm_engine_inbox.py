"""Requests that arrive while a step runs are accepted at once (no wait for the engine lock) and the next
step takes them together: prompts sent together are prefilled in one batch, whatever hands them over one
by one."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest

from tests.conftest import run_to_completion, step_in_progress
from trt_disagg.contract import RequestType, SamplingParams
from trt_disagg.engine.llm_engine import EngineInputError, LLMEngine

PROMPTS = {f"r{i}": list(range(5 + i, 45 + i)) for i in range(3)}


def returns_while_locked(call: Callable[[], None]) -> None:
    """`call` finishes although the engine lock is held (it would block until the step ends otherwise)."""
    done = threading.Event()
    error: list[BaseException] = []

    def run() -> None:
        try:
            call()
        except BaseException as exc:  # re-raised in the test's thread
            error.append(exc)
        done.set()

    threading.Thread(target=run, daemon=True).start()
    assert done.wait(10), "the call waited for the running step"  # the step holds the lock for 30 s
    if error:
        raise error[0]


def test_prompts_arriving_during_a_step_are_prefilled_together(tiny_engines) -> None:
    with LLMEngine.from_engine_dir(tiny_engines[(1, 1)], threads_per_rank=1) as engine:
        with step_in_progress(engine):
            for rid, prompt in PROMPTS.items():
                returns_while_locked(lambda rid=rid, prompt=prompt: engine.add_request(
                    rid, prompt, SamplingParams(max_new_tokens=1), RequestType.CONTEXT_ONLY))
            assert engine.has_unfinished()
        # counted as queued although no step has taken them yet (load() itself waits for a running step)
        assert engine.load().queued_prompt_tokens == sum(len(p) for p in PROMPTS.values())
        engine.step()
        assert engine.last_step is not None and engine.last_step.kind == "prefill"
        assert engine.last_step.num_seqs == len(PROMPTS)
        assert engine.num_held() == len(PROMPTS)


def test_a_request_id_is_refused_while_it_waits_in_the_inbox_and_abort_drops_it(tiny_engines) -> None:
    with LLMEngine.from_engine_dir(tiny_engines[(1, 1)], threads_per_rank=1) as engine:
        engine.add_request("a", PROMPTS["r0"], SamplingParams(max_new_tokens=2))
        with pytest.raises(EngineInputError, match="already in use"):
            engine.add_request("a", PROMPTS["r1"], SamplingParams(max_new_tokens=2))
        engine.abort("a")
        assert not engine.has_unfinished()
        engine.add_request("a", PROMPTS["r1"], SamplingParams(max_new_tokens=2))  # the id is free again
        assert len(run_to_completion(engine)["a"]) == 2
        assert engine.num_free_blocks == engine.num_total_blocks


def test_a_decode_request_arriving_during_a_step_joins_the_next_one(tiny_engines) -> None:
    with LLMEngine.from_engine_dir(tiny_engines[(1, 1)], threads_per_rank=1) as engine:
        prompt = PROMPTS["r0"]
        engine.add_request("p", prompt, SamplingParams(max_new_tokens=1), RequestType.CONTEXT_ONLY)
        (first,) = run_to_completion(engine)["p"]
        kv = engine.export_kv("p")
        with step_in_progress(engine):
            returns_while_locked(lambda: engine.add_decode_request("d", prompt, first, kv,
                                                                   SamplingParams(max_new_tokens=4)))
        assert engine.load().running_sequences == 1  # counted before a step has taken it
        engine.release_kv("p")
        decoded = run_to_completion(engine)["d"]
        engine.add_request("c", prompt, SamplingParams(max_new_tokens=4))
        assert decoded == run_to_completion(engine)["c"][1:]
