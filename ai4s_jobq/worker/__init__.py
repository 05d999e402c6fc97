"""The worker: the loop that receives, runs and settles tasks (:mod:`.loop`) and what
runs a task (:mod:`.processors`).  Each part lives in its own module so the loop stays
readable top to bottom while policies (preemption, GPUs, retries) are added beside it."""

from .loop import ExitCode, Worker, WorkerPolicy, WorkerStats, run_worker

__all__ = ["ExitCode", "Worker", "WorkerPolicy", "WorkerStats", "run_worker"]
