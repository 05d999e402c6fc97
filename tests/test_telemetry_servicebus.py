"""The trace context over Service Bus (our emulator, the official SDK): ``jobq push``
writes ``traceparent`` into the envelope and as an application property, and the
``jobq worker`` that runs the task makes its span a child of the push span."""

from __future__ import annotations

import servicebus_support as support
from conftest import jobq_cli
from otlp_receiver import OtlpReceiver
from servicebus_support import sb_env

from ai4s_jobq.task import Task
from ai4s_jobq.telemetry import names

sb_process, sb_cs, sb_queue = support.sb_process, support.sb_cs, support.sb_queue


def peek_one(cs: str, queue: str):
    from azure.servicebus import ServiceBusClient

    with ServiceBusClient.from_connection_string(cs) as client:
        with client.get_queue_receiver(queue) as receiver:
            (message,) = receiver.peek_messages(max_message_count=5)
            return message


def test_traceparent_crosses_service_bus(sb_cs, sb_queue):
    with OtlpReceiver() as receiver:
        env = sb_env(sb_cs, sb_queue)
        env = {k: v for k, v in env.items() if not k.startswith(("OTEL_", "APPLICATIONINS"))}
        env.update(OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint, OTEL_BSP_SCHEDULE_DELAY="50")
        pushed = jobq_cli("push", "-c", "echo over service bus", env=env, check=True)
        task_id = pushed.stdout.split("\t")[0]
        (send,) = receiver.wait_for(lambda: receiver.spans(f"send {sb_queue}"))
        assert send.attributes[names.MESSAGING_SYSTEM] == "servicebus"

        message = peek_one(sb_cs, sb_queue)
        properties = {
            (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
            for k, v in (message.application_properties or {}).items()
        }
        expected_prefix = f"00-{send.trace_id}-{send.span_id}-"
        assert properties[names.TRACEPARENT].startswith(expected_prefix)
        envelope = Task.from_body(b"".join(message.body))
        assert envelope.id == task_id
        assert envelope.extra[names.TRACEPARENT] == properties[names.TRACEPARENT]

        result = jobq_cli("worker", "--idle-timeout", "1", env=env)
        assert result.returncode == 0, result.stderr
        (span,) = receiver.wait_for(lambda: receiver.spans(f"process {sb_queue}"))
        assert (span.trace_id, span.parent_span_id) == (send.trace_id, send.span_id)
        assert span.attributes[names.TASK_OUTCOME] == "succeeded"
        assert span.attributes[names.MESSAGING_DESTINATION] == sb_queue
        receiver.wait_for(lambda: receiver.metric_total(names.TASKS_SUCCEEDED) == 1)
        depth = receiver.points(names.QUEUE_DEPTH)
        assert {p.attributes[names.QUEUE_STATE]: p.value for p in depth}["active"] == 1
