"""OpenTelemetry export, end to end: real ``jobq push`` and ``jobq worker`` processes
send OTLP/HTTP to a real receiver on 127.0.0.1 (``otlp_receiver``), and the tests
assert what arrived: the push and task spans and their parent/child relation, the
metric values, and the worker's log records with their task and worker IDs."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ROOT, jobq_cli, wait_for, worker_env
from otlp_receiver import OtlpReceiver, Span

from ai4s_jobq import JobQ
from ai4s_jobq.telemetry import names
from ai4s_jobq.telemetry.setup import configure_telemetry, telemetry_requested

PRODUCER, CONSUMER = 4, 5  # Span.SpanKind values in the OTLP protobuf
STATUS_ERROR = 2
QUEUE = "local://tel"


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as r:
        yield r


def otel_env(local_dir: Path, receiver: OtlpReceiver, **extra: str) -> dict[str, str]:
    """A subprocess environment exporting everything to ``receiver``; other OTEL_*
    and Application Insights variables of the test's own environment are dropped."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("OTEL_", "APPLICATIONINSIGHTS_", "JOBQ_", "TRACEPARENT"))
    }
    env.update(worker_env(local_dir))
    env.update(
        {
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
            "OTEL_BSP_SCHEDULE_DELAY": "50",
            "OTEL_BLRP_SCHEDULE_DELAY": "50",
            "JOBQ_QUEUE": QUEUE,
        }
    )
    env.update(extra)
    return env


def push(env: dict[str, str], *commands: str, retries: int = 0) -> list[str]:
    args = ["push", "--num-retries", str(retries)]
    for command in commands:
        args += ["-c", command]
    result = jobq_cli(*args, env=env, check=True)
    return [line.split("\t")[0] for line in result.stdout.splitlines()]


def work(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return jobq_cli("worker", "--idle-timeout", "0.5", *args, env=env)


def by_task(spans: list[Span]) -> dict[str, Span]:
    return {s.attributes[names.TASK_ID]: s for s in spans if s.kind == CONSUMER}


def test_push_and_worker_spans_metrics_and_logs(local_dir, receiver):
    env = otel_env(local_dir, receiver, JOBQ_TELEMETRY_LOG_LEVEL="INFO")
    ok, fails = push(env, "echo one", "exit 3")
    (dup,) = push(env, "echo one")  # the second push process: one duplicate
    assert dup == ok
    result = work(env)
    assert result.returncode == 0, result.stderr

    # ---- traces: one send span per push, one process span per task, parent = send
    sends = receiver.wait_for(lambda: receiver.spans("send tel"))
    assert len(sends) == 2
    first = next(s for s in sends if s.attributes[names.MESSAGING_BATCH_COUNT] == 2)
    assert first.kind == PRODUCER
    assert first.attributes[names.MESSAGING_DESTINATION] == "tel"
    assert first.attributes[names.MESSAGING_SYSTEM] == "jobq_local"
    assert first.attributes[names.PUSH_PUSHED] == 2
    assert first.resource["service.name"] == "jobq-push"
    tasks = receiver.wait_for(
        lambda: len(by_task(receiver.spans())) == 2 and by_task(receiver.spans())
    )
    for task_id, span in tasks.items():
        assert span.name == "process tel"
        assert span.trace_id == first.trace_id
        assert span.attributes[names.MESSAGING_MESSAGE_ID] == task_id
        assert span.parent_span_id == first.span_id
        assert span.attributes[names.TASK_ATTEMPT] == 1
        assert span.attributes[names.WORKER_ID]
        assert span.resource[names.HOST_NAME]
        assert span.resource["service.name"] == "jobq-worker"
    assert tasks[ok].attributes[names.TASK_OUTCOME] == "succeeded"
    assert tasks[ok].status_code != STATUS_ERROR
    assert tasks[fails].attributes[names.TASK_OUTCOME] == "dead_lettered"
    assert tasks[fails].attributes[names.EXIT_CODE] == 3
    assert tasks[fails].attributes[names.ERROR_TYPE] == "NonZeroExit"
    assert tasks[fails].status_code == STATUS_ERROR
    worker_id = tasks[ok].attributes[names.WORKER_ID]

    # ---- metrics (cumulative sums, final export at exit)
    total = receiver.metric_total
    receiver.wait_for(lambda: total(names.TASKS_STARTED) == 2)
    assert total(names.TASKS_PUSHED) == 2
    assert total(names.TASKS_DUPLICATES) == 1
    assert total(names.TASKS_SUCCEEDED) == 1
    assert total(names.TASKS_DEAD_LETTERED) == 1
    assert total(names.TASKS_FAILED) == 0
    assert total(names.SLOTS_BUSY) == 0
    durations = receiver.points(names.TASK_DURATION)
    assert sum(p.count or 0 for p in durations) == 2
    assert {p.attributes[names.TASK_OUTCOME] for p in durations} == {"succeeded", "dead_lettered"}
    assert all(p.unit == "s" for p in durations)
    assert not any(p.exemplars for p in durations)  # off unless asked for (cost)
    depth = {p.attributes[names.QUEUE_STATE]: p.value for p in receiver.points(names.QUEUE_DEPTH)}
    assert depth["active"] == 2  # sampled when the worker started
    assert depth["dead_letter"] == 0
    assert receiver.points(names.SLOTS_TOTAL)[-1].value == 1

    # ---- logs: every worker record has the worker ID; a task's records its ID and trace
    receiver.wait_for(lambda: [r for r in receiver.logs() if "worker stopped" in str(r.body)])
    logs = [r for r in receiver.logs() if r.resource["service.name"] == "jobq-worker"]
    assert all(r.attributes.get(names.WORKER_ID) == worker_id for r in logs)
    for task_id, span in tasks.items():
        mine = [r for r in logs if r.attributes.get(names.TASK_ID) == task_id]
        bodies = " | ".join(str(r.body) for r in mine)
        assert f"task {task_id}: attempt 1 of 1" in bodies
        assert all(r.trace_id == span.trace_id and r.span_id == span.span_id for r in mine)
    assert any(r.body == f"[{ok}] one" for r in logs)  # the shell task's own output


def test_exemplars_are_recorded_when_the_standard_variable_asks(local_dir, receiver):
    env = otel_env(local_dir, receiver, OTEL_METRICS_EXEMPLAR_FILTER="always_on")
    push(env, "true")
    assert work(env).returncode == 0
    durations = receiver.wait_for(lambda: receiver.points(names.TASK_DURATION))
    assert sum(p.exemplars for p in durations) == 1


def test_trace_context_travels_in_the_envelope_and_keeps_the_id(local_dir, receiver):
    env = otel_env(local_dir, receiver)
    (task_id,) = push(env, "echo same")
    expected = json.loads(jobq_cli("id", "-c", "echo same", "--json", check=True).stdout)["id"]
    assert task_id == expected  # the trace context is not part of the ID

    async def peek():
        async with JobQ.open(QUEUE, check=False) as q:
            return await q.peek(5)

    (peeked,) = asyncio.run(peek())
    (send,) = receiver.wait_for(lambda: receiver.spans("send tel"))
    traceparent = peeked.task.extra[names.TRACEPARENT]
    assert traceparent.startswith(f"00-{send.trace_id}-{send.span_id}-")  # then the flags
    assert peeked.task.id == task_id


def test_task_pushed_without_telemetry_gets_a_root_span(local_dir, receiver):
    env = otel_env(local_dir, receiver)
    plain = {k: v for k, v in env.items() if not k.startswith("OTEL_")}
    (task_id,) = push(plain, "echo untraced")
    assert work(env).returncode == 0
    (span,) = receiver.wait_for(lambda: receiver.spans("process tel"))
    assert span.parent_span_id == ""
    assert span.attributes[names.TASK_ID] == task_id
    assert receiver.spans("send tel") == []
    # By default only WARNING and above are exported: the idle worker's INFO lines are not.
    receiver.wait_for(lambda: receiver.received.requests["metrics"])  # the worker has flushed
    assert all(r.severity in ("WARN", "ERROR", "FATAL") for r in receiver.logs())


def test_shell_task_gets_its_span_as_traceparent(local_dir, receiver, tmp_path):
    """An instrumented program run by a shell task continues the task's trace."""
    env = otel_env(local_dir, receiver)
    out = tmp_path / "traceparent"
    push(env, f'echo "$TRACEPARENT" > {out}')
    assert work(env).returncode == 0
    (span,) = receiver.wait_for(lambda: receiver.spans("process tel"))
    assert out.read_text().startswith(f"00-{span.trace_id}-{span.span_id}-")


def test_pipeline_traceparent_is_the_push_span_parent(local_dir, receiver):
    trace_id, parent_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    env = otel_env(local_dir, receiver, TRACEPARENT=f"00-{trace_id}-{parent_id}-01")
    push(env, "echo in a pipeline")
    (send,) = receiver.wait_for(lambda: receiver.spans("send tel"))
    assert (send.trace_id, send.parent_span_id) == (trace_id, parent_id)


def test_python_task_spans_nest_under_the_task_span(local_dir, receiver, tmp_path):
    """A ``--proc`` function that makes its own span gets the task span as parent,
    can set attributes on the task span, and ``current_task()`` fallback tags its
    log records."""
    env = otel_env(local_dir, receiver)
    result = jobq_cli(
        "push", "--num-retries", "0", "--format", "json", input='{"name": "inner"}\n', env=env
    )
    assert result.returncode == 0, result.stderr
    result = work(env, "--proc", "telemetry_tasks:traced")
    assert result.returncode == 0, result.stderr
    (task,) = receiver.wait_for(lambda: receiver.spans("process tel"))
    (inner,) = receiver.wait_for(lambda: receiver.spans("inner"))
    assert (inner.trace_id, inner.parent_span_id) == (task.trace_id, task.span_id)
    assert task.attributes["user.step"] == 3  # the task's code wrote on its span
    logged = receiver.wait_for(lambda: [r for r in receiver.logs() if r.body == "inside inner"])
    assert logged[0].attributes[names.TASK_ID] == task.attributes[names.TASK_ID]


def test_interrupted_task_is_counted_as_interrupted_not_failed(local_dir, receiver, tmp_path):
    env = otel_env(local_dir, receiver)
    marker = tmp_path / "started"
    push(env, f"touch {marker} && sleep 60", retries=2)
    proc = subprocess.Popen(
        [sys.executable, "-m", "ai4s_jobq_cli", "worker", "--grace-period", "0.2"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(marker.exists, what="the task to start")
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    (span,) = receiver.wait_for(lambda: receiver.spans("process tel"))
    assert span.attributes[names.TASK_OUTCOME] == "interrupted"
    assert span.status_code != STATUS_ERROR
    receiver.wait_for(lambda: receiver.metric_total(names.TASKS_INTERRUPTED) == 1)
    assert receiver.metric_total(names.TASKS_FAILED) == 0
    assert receiver.metric_total(names.TASKS_DEAD_LETTERED) == 0


def test_signal_endpoint_and_service_name_variables(local_dir, receiver):
    """Only traces have an endpoint: no metrics or logs are sent; OTEL_SERVICE_NAME
    and OTEL_RESOURCE_ATTRIBUTES name the service."""
    env = otel_env(local_dir, receiver)
    del env["OTEL_EXPORTER_OTLP_ENDPOINT"]
    env["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"] = f"{receiver.endpoint}/v1/traces"
    env["OTEL_SERVICE_NAME"] = "my-pipeline"
    env["OTEL_RESOURCE_ATTRIBUTES"] = "deployment.environment=test"
    push(env, "echo traces only")
    assert work(env).returncode == 0
    (span,) = receiver.wait_for(lambda: receiver.spans("process tel"))
    assert span.resource["service.name"] == "my-pipeline"
    assert span.resource["deployment.environment"] == "test"
    assert receiver.received.requests["metrics"] == 0
    assert receiver.received.requests["logs"] == 0


BAD_BATCH_SETTINGS = {
    "OTEL_BSP_SCHEDULE_DELAY": "abc",
    "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "0",
    "OTEL_BSP_MAX_QUEUE_SIZE": "1e300",  # the SDK's deque overflowed
    "OTEL_BLRP_MAX_QUEUE_SIZE": "-5",
    "OTEL_METRIC_EXPORT_INTERVAL": "-1",
    "OTEL_METRIC_EXPORT_TIMEOUT": "1e300",
}


def test_invalid_batch_settings_are_warnings_and_defaults(local_dir, receiver):
    """The specification's rule for a bad value (warn, treat as unset), where the SDK
    raised or printed a traceback (telemetry/otel_env.py): push and worker run, and
    export."""
    env = otel_env(local_dir, receiver, **BAD_BATCH_SETTINGS)
    pushed = jobq_cli("push", "-c", "echo bad settings", env=env)
    assert pushed.returncode == 0 and "Traceback" not in pushed.stderr, pushed.stderr
    for variable in BAD_BATCH_SETTINGS:
        assert variable in pushed.stderr  # each named once, with the default used
    worked = work(env)
    assert worked.returncode == 0 and "Traceback" not in worked.stderr, worked.stderr
    assert receiver.wait_for(lambda: receiver.spans("process tel"))


def test_an_endpoint_that_is_not_a_url_is_a_warning_at_start(local_dir, receiver):
    """Said once at the start, naming the variable (not an SDK error per export, the
    first only at the worker's exit); the signals whose endpoint is fine still go."""
    env = otel_env(local_dir, receiver, OTEL_EXPORTER_OTLP_TRACES_ENDPOINT="collector:4318")
    result = jobq_cli("push", "-c", "echo not a url", env=env)
    assert result.returncode == 0, result.stderr
    assert "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT='collector:4318' is not an http" in result.stderr
    assert "Invalid URL" not in result.stderr and "Traceback" not in result.stderr
    assert receiver.wait_for(lambda: receiver.received.requests["metrics"])  # still exported
    assert receiver.received.requests["traces"] == 0


def test_nothing_configured_means_nothing_loaded(local_dir):
    """Without OTEL_* / Application Insights variables: no session, no hooks, and a
    push and a worker run never import the SDK (or even the API)."""
    script = """
import asyncio, sys
from ai4s_jobq import JobQ, Worker, WorkerPolicy
from ai4s_jobq.telemetry.setup import configure_telemetry
from ai4s_jobq.worker.processors import CallableProcessor
session = configure_telemetry()
assert not session.enabled and session.worker_hooks() == []
async def main():
    async with JobQ.open("local://off") as q:
        await q.push_many([{"x": 1}, {"x": 2}])
        await Worker(q.backend, CallableProcessor(lambda **_: None),
                     WorkerPolicy(idle_timeout=0.2), hooks=session.worker_hooks()).run()
asyncio.run(main())
print(sorted(m for m in sys.modules if m.startswith("opentelemetry")))
"""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "APPLICATIONINSIGHTS"))
    }
    env["JOBQ_LOCAL_DIR"] = str(local_dir)
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize(
    "environ, wanted",
    [
        ({}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:1"}, True),
        ({"OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": "http://127.0.0.1:1/v1/metrics"}, True),
        ({"APPLICATIONINSIGHTS_CONNECTION_STRING": "InstrumentationKey=x"}, True),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x", "OTEL_SDK_DISABLED": "true"}, False),
        (
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": "http://x",
                "OTEL_TRACES_EXPORTER": "none",
                "OTEL_METRICS_EXPORTER": "none",
                "OTEL_LOGS_EXPORTER": "none",
            },
            False,
        ),
        ({"OTEL_SERVICE_NAME": "only-a-name"}, False),
    ],
)
def test_which_variables_turn_telemetry_on(environ, wanted):
    assert telemetry_requested(environ) is wanted
    if not wanted:
        assert not configure_telemetry(environ=environ).enabled


@pytest.mark.slow
def test_unreachable_collector_does_not_hang_the_exit(local_dir, tmp_path):
    """With a collector that refuses connections and a 60 s exporter timeout, ``jobq
    push`` still pushes and exits within the shutdown bound (not after the retries)."""
    import socket

    with socket.socket() as sock:  # a free port with nobody listening
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "JOBQ_"))}
    env.update(
        JOBQ_LOCAL_DIR=str(local_dir),
        JOBQ_QUEUE=QUEUE,
        OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{port}",
        OTEL_EXPORTER_OTLP_TIMEOUT="60",
    )
    started = time.monotonic()
    result = jobq_cli("push", "-c", "echo still pushed", env=env, timeout=120)
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    assert "did not finish within" in result.stderr
    assert elapsed < 40, elapsed

    async def size():
        async with JobQ.open(QUEUE, check=False) as q:
            return (await q.counts()).active

    assert asyncio.run(size()) == 1


def test_missing_extra_is_a_warning_not_a_failure(local_dir):
    """OTEL_EXPORTER_OTLP_ENDPOINT set but the SDK not importable (the extra is not
    installed): the push still works and says what to install."""
    script = (
        "import sys; sys.modules['opentelemetry.sdk'] = None\n"
        "from ai4s_jobq_cli.main import main\n"
        "sys.argv = ['jobq', 'push', '-c', 'echo without the extra']\n"
        "main()\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "JOBQ_"))}
    env.update(
        JOBQ_LOCAL_DIR=str(local_dir),
        JOBQ_QUEUE=QUEUE,
        OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:9",
    )
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert "pip install 'ai4s_jobq[telemetry]'" in result.stderr
    assert "pushed 1 new task" in result.stderr


def test_malformed_message_counts_as_dead_lettered(local_dir, receiver):
    from ai4s_jobq.backends.base import OutgoingMessage

    async def put_garbage() -> None:
        async with JobQ.open(QUEUE, check=False) as q:
            await q.backend.push([OutgoingMessage("garbage-1", b"not a task")])

    asyncio.run(put_garbage())
    env = otel_env(local_dir, receiver)
    assert work(env).returncode == 0
    receiver.wait_for(lambda: receiver.points(names.TASKS_DEAD_LETTERED))
    assert (
        receiver.metric_total(names.TASKS_DEAD_LETTERED, **{names.ERROR_TYPE: "MalformedTask"}) == 1
    )
    assert receiver.metric_total(names.TASKS_STARTED) == 0
