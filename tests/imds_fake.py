"""A stand-in for the Azure Instance Metadata Service's Scheduled Events endpoint.

IMDS exists only inside an Azure VM (http://169.254.169.254), so it is the one thing
these tests fake: a small HTTP server on 127.0.0.1 (a free port, stopped when the test
ends) that answers ``GET /metadata/scheduledevents`` with the events a test sets, the
VM name under ``/metadata/instance/compute/name``, and records ``StartRequests``
acknowledgements.  The worker reaches it through ``JOBQ_IMDS_ENDPOINT``.
"""

from __future__ import annotations

import email.utils
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class FakeIMDS:
    def __init__(self, vm_name: str = "node-0"):
        self.vm_name = vm_name
        self.events: list[dict[str, Any]] = []
        self.incarnation = 1
        self.acks: list[str] = []
        self.requests = 0
        self.missing_metadata_header = 0
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _reply(self, status: int, body: bytes, kind: str = "application/json") -> None:
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                fake.requests += 1
                if self.headers.get("Metadata") != "true":
                    fake.missing_metadata_header += 1
                    self._reply(400, b'{"error": "Bad request. Required metadata header"}')
                elif self.path.startswith("/metadata/scheduledevents"):
                    document = {"DocumentIncarnation": fake.incarnation, "Events": fake.events}
                    self._reply(200, json.dumps(document).encode())
                elif self.path.startswith("/metadata/instance/compute/name"):
                    self._reply(200, fake.vm_name.encode(), "text/plain")
                else:
                    self._reply(404, b"{}")

            def do_POST(self) -> None:  # noqa: N802
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                for request in body.get("StartRequests", []):
                    fake.acks.append(request.get("EventId"))
                self._reply(200, b"")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> FakeIMDS:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def schedule(
        self,
        event_type: str = "Preempt",
        in_seconds: float = 30.0,
        resources: list[str] | None = None,
        event_id: str = "EVT-1",
    ) -> None:
        """Publish an event as Azure does: NotBefore is an RFC 1123 date."""
        not_before = email.utils.formatdate(time.time() + in_seconds, usegmt=True)
        self.events.append(
            {
                "EventId": event_id,
                "EventType": event_type,
                "ResourceType": "VirtualMachine",
                "Resources": [self.vm_name] if resources is None else resources,
                "EventStatus": "Scheduled",
                "NotBefore": not_before,
                "Description": "",
                "EventSource": "Platform",
                "DurationInSeconds": -1,
            }
        )
        self.incarnation += 1
