from __future__ import annotations

from trt_disagg.contract import RequestType, SamplingParams
from trt_disagg.engine.block_pool import BlockPool
from trt_disagg.engine.scheduler import Scheduler, StepKind
from trt_disagg.engine.sequence import Sequence
from trt_disagg.engine_dir import EngineLimits


def seq(rid: str, n: int, new: int = 4, kind: RequestType = RequestType.CONTEXT_AND_GENERATION) -> Sequence:
    return Sequence(rid, list(range(n)), SamplingParams(max_new_tokens=new), kind, None)


def test_prefill_batches_are_fcfs_within_token_and_batch_budgets() -> None:
    sched = Scheduler(EngineLimits(max_batch_size=3, max_input_len=64, max_seq_len=128, max_num_tokens=20),
                      BlockPool(100, 4))
    for rid, n in [("a", 8), ("b", 8), ("c", 8), ("d", 2)]:
        sched.waiting.append(seq(rid, n))
    step = sched.schedule()
    assert step is not None and step.kind is StepKind.PREFILL
    assert [s.request_id for s in step.seqs] == ["a", "b"]  # c would pass 20 tokens; d must not overtake it
    sched.running.extend(step.seqs)
    step = sched.schedule()
    assert step is not None and [s.request_id for s in step.seqs] == ["c"]  # batch size 3 with 2 running
    sched.running.extend(step.seqs)
    step = sched.schedule()
    assert step is not None and step.kind is StepKind.DECODE and len(step.seqs) == 3


def test_admission_reserves_the_whole_life_and_waits_when_full() -> None:
    pool = BlockPool(4, 4)
    sched = Scheduler(EngineLimits(8, 64, 128, 128), pool)
    sched.waiting.extend([seq("a", 6, new=6), seq("b", 6, new=6)])  # 12 tokens -> 3 blocks each
    step = sched.schedule()
    assert step is not None and [s.request_id for s in step.seqs] == ["a"]
    assert pool.num_free_blocks == 1
    prefill_only = seq("p", 6, new=100, kind=RequestType.CONTEXT_ONLY)
    assert prefill_only.max_total_tokens(128) == 6  # context_only keeps only the prompt's KV
