"""OpenTelemetry for jobq: traces, metrics and logs of pushes and task runs.

Why a package of its own: the library depends only on ``opentelemetry-api`` (a no-op
until a provider is installed), and everything that needs the SDK or an exporter
(``ai4s_jobq[telemetry]``) is imported only by :mod:`.setup`, which the CLI calls once
at start-up.  The rest of the library sees telemetry in two places, both checked once
and free when nothing is configured:

* :mod:`.push` — a span per pushed batch, the producer's W3C trace context written
  into each task envelope (``traceparent``), push counters;
* :mod:`.worker_hook` — a :class:`~ai4s_jobq.worker.hooks.WorkerHook` that gives each
  task attempt a span (a child of the span that pushed it), counts outcomes, samples
  the queue depth, and tags worker log records with the task and worker IDs.

The exported names (spans, metrics, attributes) are in :mod:`.names` and tabled in
``docs/monitoring.md``.
"""
