"""Export to Azure Monitor through ``APPLICATIONINSIGHTS_CONNECTION_STRING``.

Application Insights cannot run here, so its ingestion endpoint is stood in for by
``appinsights_receiver`` on 127.0.0.1 (the connection string's ``IngestionEndpoint``
points there); everything else is real: the ``jobq`` processes and the
``azure-monitor-opentelemetry`` exporters.  Statsbeat (the exporter's own usage
telemetry, sent to Microsoft) is turned off with its documented variables."""

from __future__ import annotations

import os

from appinsights_receiver import AppInsightsReceiver
from conftest import jobq_cli, worker_env


def test_worker_and_push_export_to_application_insights(local_dir):
    with AppInsightsReceiver() as receiver:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("OTEL_", "APPLICATIONINSIGHTS_", "JOBQ_"))
        }
        env.update(worker_env(local_dir))
        env.update(
            JOBQ_QUEUE="local://ai",
            APPLICATIONINSIGHTS_CONNECTION_STRING=receiver.connection_string,
            APPLICATIONINSIGHTS_STATSBEAT_DISABLED_ALL="true",
            APPLICATIONINSIGHTS_SDKSTATS_DISABLED="true",
            OTEL_BSP_SCHEDULE_DELAY="50",
        )
        pushed = jobq_cli("push", "--num-retries", "0", "-c", "echo hi", "-c", "exit 2", env=env)
        assert pushed.returncode == 0, pushed.stderr
        ok_id, failing_id = (line.split("\t")[0] for line in pushed.stdout.splitlines())
        result = jobq_cli("worker", "--idle-timeout", "0.5", env=env)
        assert result.returncode == 0, result.stderr

        # The push span is a dependency, each task span a request under it.
        (dependency,) = receiver.items("RemoteDependencyData")
        assert dependency["name"] == "send ai"
        requests = {r["properties"]["jobq.task.id"]: r for r in receiver.items("RequestData")}
        assert set(requests) == {ok_id, failing_id}
        assert requests[ok_id]["success"] is True
        assert requests[failing_id]["success"] is False
        assert requests[failing_id]["properties"]["jobq.task.outcome"] == "dead_lettered"
        envelopes = {
            e["data"]["baseData"].get("id"): e
            for e in receiver.envelopes
            if e["data"]["baseType"] in ("RequestData", "RemoteDependencyData")
        }
        push_tags = envelopes[dependency["id"]]["tags"]
        for request in requests.values():
            tags = envelopes[request["id"]]["tags"]
            assert tags["ai.operation.id"] == push_tags["ai.operation.id"]
            assert tags["ai.operation.parentId"] == dependency["id"]
            assert tags["ai.cloud.role"] == "jobq-worker"

        metrics = {
            m["name"]: m["value"]
            for data in receiver.items("MetricData")
            for m in data["metrics"]
            if "error.type" not in data.get("properties", {})
        }
        assert metrics["jobq.tasks.started"] == 2
        assert metrics["jobq.tasks.succeeded"] == 1
        assert metrics["jobq.tasks.dead_lettered"] == 1
        assert metrics["jobq.tasks.pushed"] == 2
        assert all(path.endswith("/v2.1/track") for path in receiver.paths)
