"""A worker that dies (``os._exit``) at the worst moment of a reschedule: after it sent
the retry's copy of a failed task and before it completed the original.  Run as a
subprocess by the tests: ``python crash_mid_reschedule.py SPEC``, with the connection
string (if any) in ``JOBQ_CONNECTION_STRING``."""

from __future__ import annotations

import asyncio
import os
import sys
from typing import Any

import sample_tasks

from ai4s_jobq import JobQ, Worker, WorkerPolicy
from ai4s_jobq.worker.processors import CallableProcessor
from ai4s_jobq.worker.retry import RetryDelay


async def main(spec: str) -> None:
    async with JobQ.open(spec, check=False) as q:
        backend: Any = q.backend
        send = backend.send_scheduled

        async def send_then_die(message: Any, delay: float) -> None:
            await send(message, delay)
            os._exit(9)

        backend.send_scheduled = send_then_die
        policy = WorkerPolicy(idle_timeout=0, retry_delay=RetryDelay.fixed(1))
        await Worker(backend, CallableProcessor(sample_tasks.fail_first), policy).run()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
