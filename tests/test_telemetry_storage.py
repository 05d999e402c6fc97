"""The trace context over Azure Storage Queue (Azurite): the envelope carries the
push span's ``traceparent``, so the worker's task span is its child there too."""

from __future__ import annotations

import os

from conftest import jobq_cli
from otlp_receiver import OtlpReceiver

from ai4s_jobq.telemetry import names


def test_traceparent_crosses_storage_queue(azurite, storage_queue_name, tmp_path):
    with OtlpReceiver() as receiver:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("OTEL_", "APPLICATIONINS", "JOBQ_", "TRACEPARENT"))
        }
        env.update(
            JOBQ_CONNECTION_STRING=azurite.connection_string,
            JOBQ_QUEUE=f"devstoreaccount1/{storage_queue_name}",
            JOBQ_LOCAL_DIR=str(tmp_path),
            OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint,
            OTEL_BSP_SCHEDULE_DELAY="50",
        )
        pushed = jobq_cli("push", "-c", "echo over storage", env=env, check=True)
        task_id = pushed.stdout.split("\t")[0]
        (send,) = receiver.wait_for(lambda: receiver.spans(f"send {storage_queue_name}"))
        assert send.attributes[names.MESSAGING_SYSTEM] == "azure_storage_queue"
        result = jobq_cli("worker", "--idle-timeout", "1", env=env)
        assert result.returncode == 0, result.stderr
        (span,) = receiver.wait_for(lambda: receiver.spans(f"process {storage_queue_name}"))
        assert (span.trace_id, span.parent_span_id) == (send.trace_id, send.span_id)
        assert span.attributes[names.TASK_ID] == task_id
        assert span.attributes[names.TASK_OUTCOME] == "succeeded"
