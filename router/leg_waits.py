"""Every wait of a leg on its instance, bounded three ways: the request's deadline, the leg's inactivity
limit (a hung instance sends nothing), and its abandonment (Legs.abandon: the instance left the registry, or
the router is stopping), which fires the wait at once. When a wait ends early, `wait_failed` says why:

    abandoned                 the error the abandonment carried (InstanceLost, ShuttingDown)
    past the request deadline DeadlineExceeded: the request is over
    otherwise                 InstanceLost: the instance went quiet; the leg continues on another instance
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator
from contextlib import aclosing

from router.errors import DeadlineExceeded
from router.instance_client import InstanceLost
from router.job import Job
from trt_disagg.contract import InstanceInfo, Role


async def deadlined(stream: AsyncGenerator[int, None], job: Job, role: Role, inst: InstanceInfo,
                    inactivity_s: float) -> AsyncGenerator[int, None]:
    """`stream`'s tokens, each waited for under the request's deadline, `inactivity_s` and abandonment."""
    async with aclosing(stream):
        while True:
            error = job.legs.abandoned.get(role)
            if error is not None:
                raise error
            try:
                async with deadline_timeout(job, min(job.deadline_s, time.monotonic() + inactivity_s)) as wait:
                    job.legs.waiting[role] = wait
                    token = await anext(stream)
            except StopAsyncIteration:
                return
            except TimeoutError:
                raise wait_failed(job, role, inst, "while generating", inactivity_s) from None
            yield token


def wait_failed(job: Job, role: Role, inst: InstanceInfo, during: str, inactivity_s: float) -> Exception:
    abandoned = job.legs.abandoned.get(role)
    if abandoned is not None:
        return abandoned
    if time.monotonic() >= job.deadline_s:
        return DeadlineExceeded(f"request deadline passed {during}")
    return InstanceLost(inst.instance_id, f"no token for {inactivity_s:g}s (leg_inactivity_timeout_s)")


def deadline_timeout(job: Job, until_s: float | None = None) -> asyncio.Timeout:
    """A timeout at monotonic time `until_s` (default: the request's deadline) on the loop's clock."""
    loop_now = asyncio.get_running_loop().time()
    return asyncio.timeout_at(loop_now + ((until_s or job.deadline_s) - time.monotonic()))
