"""The Redis client must let a task be cancelled in the middle of a command.

The router cancels tasks that can be inside a Redis command: its background refresh at shutdown, a
request's handler when its client hangs up. redis-py 8.1 sometimes completes the command instead and
the task carries on as if never cancelled; a refresh loop that did so kept a router's shutdown waiting
forever (one CI run of the decode-kill test). pyproject pins redis<8 and the refresh loop also stops on
an event; this test places a cancel at every await point of a few commands and fails if any is lost.
"""

from __future__ import annotations

import asyncio


async def test_a_cancel_during_a_redis_command_is_never_swallowed(redis):
    await redis.set("k", "v")
    swallowed = 0
    for steps in range(60):  # cancel after 0, 1, 2, ... loop iterations: every await point in turn
        async def commands() -> None:
            nonlocal swallowed
            while True:
                await redis.get("k")
                pipe = redis.pipeline(transaction=True)
                pipe.set("k", "v")
                pipe.get("k")
                await pipe.execute()
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    swallowed += 1  # a command returned although the task was cancelled during it
                    return

        task = asyncio.create_task(commands())
        for _ in range(steps):
            await asyncio.sleep(0)  # let the task run one more step (placement, not waiting for anything)
        task.cancel()
        await asyncio.wait([task], timeout=10)
        assert task.done()
    assert swallowed == 0, f"{swallowed} of 60 cancels were swallowed by the Redis client"
