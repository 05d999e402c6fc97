"""Every exported name in one place: span names, metric names, attribute keys.

OpenTelemetry's messaging semantic conventions are used where they fit (the
``messaging.*`` attributes, ``send``/``process`` span names and kinds, ``error.type``,
``host.name``, ``process.exit.code``); what they have no word for is under ``jobq.*``.
``docs/monitoring.md`` tables these names; change both together.
"""

from __future__ import annotations

INSTRUMENTATION_SCOPE = "ai4s_jobq"

# --------------------------------------------------------------------- span attributes
MESSAGING_SYSTEM = "messaging.system"
MESSAGING_DESTINATION = "messaging.destination.name"
MESSAGING_OPERATION_NAME = "messaging.operation.name"
MESSAGING_OPERATION_TYPE = "messaging.operation.type"
MESSAGING_MESSAGE_ID = "messaging.message.id"
MESSAGING_BATCH_COUNT = "messaging.batch.message_count"
MESSAGING_CONSUMER_GROUP = "messaging.consumer.group.name"
ERROR_TYPE = "error.type"
HOST_NAME = "host.name"  # a resource attribute (one per process)
EXIT_CODE = "process.exit.code"

TASK_ID = "jobq.task.id"
TASK_ATTEMPT = "jobq.task.attempt"
TASK_OUTCOME = "jobq.task.outcome"
WORKER_ID = "jobq.worker.id"
PUSH_PUSHED = "jobq.push.pushed"
PUSH_DUPLICATES = "jobq.push.duplicates"
PUSH_FAILED = "jobq.push.failed"
QUEUE_STATE = "jobq.queue.state"  # on the depth gauge: active, dead_letter, scheduled

# How a backend kind is named in ``messaging.system``: the conventions' own value for
# Service Bus; the others have none, so they get a jobq-specific one.
MESSAGING_SYSTEMS = {
    "servicebus": "servicebus",
    "storage": "azure_storage_queue",
    "local": "jobq_local",
}

# --------------------------------------------------------------------- metrics
TASKS_STARTED = "jobq.tasks.started"
TASKS_SUCCEEDED = "jobq.tasks.succeeded"
TASKS_FAILED = "jobq.tasks.failed"  # attempts that failed and will be retried
TASKS_DEAD_LETTERED = "jobq.tasks.dead_lettered"  # last attempt failed, or not a task
TASKS_INTERRUPTED = "jobq.tasks.interrupted"  # shutdown, preemption, time limit
TASKS_LOCK_LOST = "jobq.tasks.lock_lost"
TASK_DURATION = "jobq.task.duration"
TASK_DURATION_DESCRIPTION = "How long task attempts ran"
SLOTS_BUSY = "jobq.worker.slots.busy"
SLOTS_TOTAL = "jobq.worker.slots.total"
QUEUE_DEPTH = "jobq.queue.depth"
TASKS_PUSHED = "jobq.tasks.pushed"
TASKS_DUPLICATES = "jobq.tasks.duplicates"
PUSH_FAILURES = "jobq.push.failures"

# --------------------------------------------------------------------- envelope
# W3C trace context keys written into the task envelope's extra fields.
TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
