"""AMQP 1.0 front end: one proton engine per client connection.

Each accepted socket is served by its own thread, which feeds the bytes into a
``proton.Transport`` (server mode, SASL ANONYMOUS as the SDK uses for CBS) and
reacts to the engine's events:

* links to ``$cbs`` carry ``put-token`` requests; a SAS token is checked
  against the emulator's key (:mod:`.auth`), an Azure AD JWT against its AAD
  trust key (:mod:`.jwt_auth`), and the audience is remembered as granted for
  this connection;
* a link whose target is a queue (``amqps://host/queue``) is a sender: every
  transfer is enqueued through the broker core (batches are unpacked; duplicates
  are accepted and dropped by the core);
* a link whose source is a queue or ``queue/$DeadLetterQueue`` is a receiver:
  messages are locked (peek-lock) or removed (receive-and-delete) as credit
  allows, with the lock token as delivery tag, and dispositions settle them;
* ``queue/$management`` links answer the request/response operations in
  :mod:`.mgmt_ops`.

Waiting receivers are woken by the broker core's listener (through the
:class:`~.hub.WakeHub`) or, for time-driven changes such as a lock expiring or a
scheduled message coming due, at the time :meth:`BrokerCore.next_due_time`
reports.  Anything a client does wrong ends at most its own link or connection.
"""

from __future__ import annotations

import itertools
import logging
import selectors
import socket
import threading
import time
from typing import Any, cast

from proton import (
    Collector,
    Condition,
    Connection,
    Delivery,
    Disposition,
    Endpoint,
    Event,
    Link,
    Message,
    Session,
    Terminus,
    Transport,
    symbol,
)

from ai4s_jobq.broker_core import (
    ACTIVE,
    BrokerError,
    InvalidOperation,
    LockLost,
    MessageTooLarge,
    QueueNotFound,
)

from . import codec, mgmt_ops
from .addresses import CBS_NODE, LinkRole, classify, normalise_address
from .auth import AuthError
from .hub import EmulatorContext

log = logging.getLogger(__name__)

INCOMING_CREDIT = 200
MAX_RECEIVE_BATCH = 64
MAX_IDLE_WAIT = 1.0  # upper bound on a sleep, in case another process changed the store
LOCK_LOST = "com.microsoft:message-lock-lost"
DEAD_LETTER_CONDITION = "com.microsoft:dead-letter"


class AmqpConnection:
    """Serves one client socket until either side closes it."""

    def __init__(self, sock: socket.socket, ctx: EmulatorContext, peer: str = "?"):
        self.sock = sock
        self.ctx = ctx
        self.peer = peer
        self.granted: set[str] = set()
        self.connection = Connection()
        self.collector = Collector()
        self.connection.collect(self.collector)
        self.transport = Transport(Transport.SERVER)
        self.transport.sasl().allowed_mechs("ANONYMOUS")
        self.transport.bind(self.connection)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._pending_lock = threading.Lock()
        self._pending_queues: set[str] = set()
        self._queue_senders: list[Link] = []
        self._tags = itertools.count(1)
        self._stopping = False

    # ------------------------------------------------------------------ io loop

    def wake(self, queue: str) -> None:
        """Called from any thread when ``queue`` may have receivable messages."""
        with self._pending_lock:
            self._pending_queues.add(queue)
        try:
            self._wake_w.send(b"x")
        except OSError:  # buffer full (a wake-up is already pending) or closed
            pass

    def stop(self) -> None:
        self._stopping = True
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass

    def serve(self) -> None:
        self.ctx.hub.subscribe(self.wake)
        selector = selectors.DefaultSelector()
        self.sock.setblocking(False)
        selector.register(self.sock, selectors.EVENT_READ, "sock")
        selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        timer_fired = False
        try:
            while not self._stopping:
                self._process_events()
                self._flush_pending(timer_fired)
                self._process_events()
                if not self._write_output() or self.transport.closed:
                    break
                timeout, timer_due = self._next_timeout()
                ready = selector.select(timeout)
                for key, _ in ready:
                    if key.data == "sock":
                        if not self._read_input():
                            self.transport.close_tail()
                            selector.unregister(self.sock)
                    else:
                        self._drain_wake_socket()
                timer_fired = not ready or (timer_due is not None and time.time() >= timer_due)
                self.transport.tick(time.monotonic())
        except Exception:
            log.exception("AMQP connection from %s failed", self.peer)
        finally:
            self.ctx.hub.unsubscribe(self.wake)
            selector.close()
            for s in (self.sock, self._wake_r, self._wake_w):
                try:
                    s.close()
                except OSError:
                    pass

    def _read_input(self) -> bool:
        capacity = self.transport.capacity()
        if capacity < 0:
            return False
        if capacity == 0:
            return True
        try:
            data = self.sock.recv(min(capacity, 256 * 1024))
        except BlockingIOError:
            return True
        except OSError:
            return False
        if not data:
            return False
        self.transport.push(data)
        return True

    def _write_output(self) -> bool:
        while True:
            pending = self.transport.pending()
            if pending < 0:
                return False  # head closed: nothing more will ever be written
            if pending == 0:
                return True
            chunk = self.transport.peek(pending)
            if chunk is None:
                return False  # end of stream (peek's None), as for pending < 0
            try:
                self.sock.setblocking(True)
                self.sock.sendall(chunk)
            except OSError:
                return False
            finally:
                try:
                    self.sock.setblocking(False)
                except OSError:
                    pass
            self.transport.pop(len(chunk))

    def _drain_wake_socket(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def _next_timeout(self) -> tuple[float, float | None]:
        """Seconds to sleep, and the wall-clock time a waiting receiver's queue
        next changes by itself (None if no receiver waits on such a change)."""
        now = time.monotonic()
        timeout = MAX_IDLE_WAIT
        deadline = self.transport.tick(now)
        if deadline:
            timeout = min(timeout, max(deadline - now, 0.0))
        wall = time.time()
        timer_due: float | None = None
        for link in self._live_queue_senders():
            if link.credit <= 0:
                continue
            role: LinkRole = link.jq_role
            try:
                due = self.ctx.core.next_due_time(role.queue, sub_queue=role.sub_queue)
            except BrokerError:
                continue
            if due is not None:
                timer_due = due if timer_due is None else min(timer_due, due)
        if timer_due is not None:
            timeout = min(timeout, max(timer_due - wall, 0.0) + 0.002)
        return timeout, timer_due

    # ------------------------------------------------------------------ events

    def _process_events(self) -> None:
        while True:
            event = self.collector.peek()
            if event is None:
                return
            try:
                self._dispatch(event)
            except Exception:
                log.exception("error handling %s from %s", event.type, self.peer)
                self._fail_connection("amqp:internal-error", "the emulator failed on a request")
            finally:
                self.collector.pop()

    def _fail_connection(self, condition: str, description: str) -> None:
        if self.connection.state & Endpoint.LOCAL_CLOSED:
            return
        self.connection.condition = _condition(condition, description)
        self.connection.close()

    def _dispatch(self, event: Event) -> None:
        kind = event.type
        if kind == Event.CONNECTION_REMOTE_OPEN:
            self.connection.container = "ai4s-jobq-emulator"
            self.connection.open()
        elif kind == Event.SESSION_REMOTE_OPEN:
            _event_session(event).open()
        elif kind == Event.LINK_REMOTE_OPEN:
            self._on_link_open(_event_link(event))
        elif kind == Event.LINK_REMOTE_CLOSE:
            link = _event_link(event)
            if link in self._queue_senders:
                self._queue_senders.remove(link)
            if not link.state & Endpoint.LOCAL_CLOSED:
                link.close()
        elif kind == Event.SESSION_REMOTE_CLOSE:
            session = _event_session(event)
            if not session.state & Endpoint.LOCAL_CLOSED:
                session.close()
        elif kind == Event.CONNECTION_REMOTE_CLOSE:
            if not self.connection.state & Endpoint.LOCAL_CLOSED:
                self.connection.close()
        elif kind == Event.LINK_FLOW:
            link = _event_link(event)
            if link.is_sender and getattr(link, "jq_role", None) is not None:
                self._pump(link)
        elif kind == Event.DELIVERY:
            delivery = _event_delivery(event)
            if delivery.link.is_receiver:
                self._on_incoming(delivery)
            else:
                self._on_outgoing_update(delivery)

    # ------------------------------------------------------------------ links

    def _on_link_open(self, link: Link) -> None:
        address = link.remote_target.address if link.is_receiver else link.remote_source.address
        role = classify(address)
        if role.queue:  # names are case-insensitive: use the queue's stored spelling
            role.queue = self.ctx.core.resolve_queue_name(role.queue) or role.queue
        link.jq_role = role
        # the setter's stub says str, but proton accepts None (no address) as well
        link.source.address = cast(str, link.remote_source.address)
        link.target.address = cast(str, link.remote_target.address)
        link.snd_settle_mode = link.remote_snd_settle_mode
        link.rcv_settle_mode = link.remote_rcv_settle_mode
        error = self._check_link(role, link)
        if error is not None:
            # as Service Bus does: attach with no terminus on our side, then detach
            # with the error (pyamqp reports the detach's error to the caller)
            if link.is_receiver:
                link.target.type = Terminus.UNSPECIFIED
            else:
                link.source.type = Terminus.UNSPECIFIED
            link.open()
            link.condition = _condition(*error)
            link.close()
            return
        if role.kind == "queue":
            props = self.ctx.core.get_queue(role.queue)
            link.max_message_size = props.max_message_size
        link.open()
        if link.is_receiver:
            link.flow(INCOMING_CREDIT)
        elif role.kind == "queue":
            role.receive_and_delete = link.remote_snd_settle_mode == Link.SND_SETTLED
            self._queue_senders.append(link)
            self._pump(link)

    def _check_link(self, role: LinkRole, link: Link) -> tuple[str, str] | None:
        if role.kind == "cbs":
            return None
        if not role.queue:
            return ("amqp:not-found", "no entity address on the link")
        if not self.ctx.authority.covers(self.granted, role.node):
            return (
                "amqp:unauthorized-access",
                f"no valid put-token covers {role.queue!r} on this connection",
            )
        if not self.ctx.core.queue_exists(role.queue):
            return ("amqp:not-found", f"the messaging entity {role.queue!r} could not be found")
        if role.kind == "queue" and link.is_receiver and role.sub_queue != ACTIVE:
            return ("amqp:not-allowed", "messages cannot be sent to a dead-letter queue")
        return None

    def _live_queue_senders(self) -> list[Link]:
        return [
            link
            for link in self._queue_senders
            if not link.state & (Endpoint.LOCAL_CLOSED | Endpoint.REMOTE_CLOSED)
        ]

    def _flush_pending(self, everything: bool) -> None:
        """Pump the receivers of queues the hub reported, or every idle receiver
        when a timer fired (time alone can make messages receivable)."""
        with self._pending_lock:
            queues, self._pending_queues = self._pending_queues, set()
        if not queues and not everything:
            return
        for link in self._live_queue_senders():
            if link.credit > 0 and (everything or link.jq_role.queue in queues):
                self._pump(link)

    # ------------------------------------------------------------------ receiving (to the client)

    def _pump(self, link: Link) -> None:
        """Deliver as many messages as the link has credit for."""
        role: LinkRole = link.jq_role
        if role.kind != "queue" or link.state & (Endpoint.LOCAL_CLOSED | Endpoint.REMOTE_CLOSED):
            return
        core = self.ctx.core
        while link.credit > 0:
            try:
                messages = core.receive(
                    role.queue,
                    min(link.credit, MAX_RECEIVE_BATCH),
                    sub_queue=role.sub_queue,
                    receive_and_delete=role.receive_and_delete,
                )
            except QueueNotFound:
                link.condition = _condition("amqp:not-found", f"{role.queue!r} was deleted")
                link.close()
                return
            if not messages:
                break
            for message in messages:
                info = codec.DeliveryInfo(
                    sequence_number=message.sequence_number,
                    enqueued_time=message.enqueued_time,
                    # Azure puts DeliveryCount - 1 in the header: 0 on a first delivery
                    delivery_count=max(message.delivery_count - 1, 0),
                    locked_until=message.locked_until,
                    dead_letter_reason=message.dead_letter_reason,
                    dead_letter_description=message.dead_letter_description,
                    extra_properties=message.properties,
                    time_to_live=message.time_to_live,
                )
                payload = codec.render_for_delivery(message.body, info)
                if message.lock_token:
                    tag = codec.lock_token_to_tag(message.lock_token)
                else:
                    tag = next(self._tags).to_bytes(8, "big")
                # delivery tags are bytes on the wire; proton's stub says str but takes bytes
                delivery = link.delivery(cast(str, tag))
                # proton's Python API decodes tags as UTF-8, so keep the token beside it
                delivery.jq_token = message.lock_token
                link.send(payload)
                link.advance()
                if role.receive_and_delete:
                    delivery.settle()
        if link.drain_mode and link.credit > 0:
            link.drained()

    def _on_outgoing_update(self, delivery) -> None:
        """A client settled (or changed the state of) a delivery we sent."""
        if not delivery.updated:
            return
        role: LinkRole | None = getattr(delivery.link, "jq_role", None)
        token = getattr(delivery, "jq_token", None)
        state = delivery.remote_state
        if role is None or role.kind != "queue" or role.receive_and_delete or token is None:
            delivery.settle()
            return
        core = self.ctx.core
        echo = state
        try:
            if state == Disposition.ACCEPTED:
                core.complete(token)
            elif state == Disposition.MODIFIED:
                remote = delivery.remote
                changes = _plain_properties(remote.annotations)
                if remote.undeliverable:
                    core.defer(token, changes)
                else:
                    core.abandon(token, changes)
            elif state == Disposition.REJECTED:
                reason, description = _dead_letter_details(delivery.remote.condition)
                core.dead_letter(token, reason=reason, description=description)
            elif state == Disposition.RELEASED:
                core.release(token)
            else:
                return  # "received" or no outcome yet: nothing to settle
        except LockLost as exc:
            delivery.local.condition = _condition(LOCK_LOST, str(exc))
            echo = Disposition.REJECTED
        except InvalidOperation as exc:
            delivery.local.condition = _condition("amqp:not-allowed", str(exc))
            echo = Disposition.REJECTED
        if not delivery.settled:
            delivery.update(echo)
        delivery.settle()

    # ------------------------------------------------------------------ transfers from the client

    def _on_incoming(self, delivery) -> None:
        link = delivery.link
        if delivery.aborted:
            delivery.settle()
            return
        if not delivery.readable or delivery.partial:
            return
        payload = link.recv(delivery.pending) or b""
        link.advance()
        role: LinkRole | None = getattr(link, "jq_role", None)
        condition: Condition | None = None
        try:
            if role is None:
                condition = _condition("amqp:not-allowed", "link is not attached")
            elif role.kind == "queue":
                condition = self._ingest(role, payload)
            elif role.kind == "cbs":
                self._on_cbs_request(link, payload)
            else:
                self._on_mgmt_request(link, role, payload)
        except codec.MalformedMessage as exc:
            condition = _condition("amqp:decode-error", str(exc))
        except codec.HeaderTooLarge as exc:
            condition = _condition("amqp:link:message-size-exceeded", str(exc))
        if not delivery.settled:
            if condition is not None:
                delivery.local.condition = condition
                delivery.update(Disposition.REJECTED)
            else:
                delivery.update(Disposition.ACCEPTED)
        delivery.settle()
        if link.credit < INCOMING_CREDIT // 2 and not link.state & Endpoint.LOCAL_CLOSED:
            link.flow(INCOMING_CREDIT - link.credit)

    def _ingest(self, role: LinkRole, payload: bytes) -> Condition | None:
        parsed = codec.parse_message(payload)
        batch = codec.split_batch(parsed)
        messages = [mgmt_ops.new_message_from_parsed(p) for p in (batch or [parsed])]
        try:
            self.ctx.core.send(role.queue, messages)
        except MessageTooLarge as exc:
            return _condition("amqp:link:message-size-exceeded", str(exc))
        except QueueNotFound as exc:
            return _condition("amqp:not-found", str(exc))
        return None

    def _reply_link(self, request_link: Link, node: str) -> Link | None:
        """The client's response link for ``node``: a sender on the same session
        whose source is the node (the SDK attaches both with the same address)."""
        fallback = None
        link = self.connection.link_head(Endpoint.LOCAL_ACTIVE)
        while link is not None:
            if link.is_sender and normalise_address(link.remote_source.address) == node:
                if link.session == request_link.session:
                    return link
                fallback = fallback or link
            link = link.next(Endpoint.LOCAL_ACTIVE)
        return fallback

    def _respond(self, request_link: Link, node: str, request: Message, reply: Message) -> None:
        reply.correlation_id = request.id
        if request.reply_to:
            reply.address = request.reply_to
        link = self._reply_link(request_link, node)
        if link is None:
            log.info("no response link for %s from %s; dropping the reply", node, self.peer)
            return
        # delivery tags are bytes on the wire; proton's stub says str but takes bytes
        delivery = link.delivery(cast(str, next(self._tags).to_bytes(8, "big")))
        link.send(reply.encode())
        link.advance()
        delivery.settle()

    def _on_cbs_request(self, link: Link, payload: bytes) -> None:
        request = Message()
        request.decode(payload)
        props: dict[Any, Any] = request.properties or {}
        operation = props.get("operation")
        audience = str(props.get("name") or "")
        if operation != "put-token":
            status, text = 400, f"unsupported CBS operation {operation!r}"
        else:
            try:
                # a put-token body is the token (str or bytes); proton types it as any AMQP value
                self.ctx.check_cbs_token(cast("str | bytes", request.body or ""), audience)
            except AuthError as exc:
                status, text = 401, f"Unauthorized: {exc}"
            else:
                self.granted.add(audience)
                status, text = 202, "Accepted"
        reply = Message(properties={"status-code": status, "status-description": text})
        self._respond(link, CBS_NODE, request, reply)

    def _on_mgmt_request(self, link: Link, role: LinkRole, payload: bytes) -> None:
        request = Message()
        request.decode(payload)
        props: dict[Any, Any] = request.properties or {}
        operation = str(props.get("operation") or "")
        target = mgmt_ops.MgmtTarget(role.queue, role.sub_queue)
        result = mgmt_ops.handle(self.ctx, target, operation, request.body)
        app = {"statusCode": result.status, "statusDescription": result.description}
        if result.condition is not None:
            app["errorCondition"] = result.condition
            app["error-condition"] = result.condition
        reply = Message(properties=app, body=result.body)
        self._respond(link, role.node, request, reply)


def _event_session(event: Event) -> Session:
    """The session of a SESSION_* event (proton types it Optional for all events)."""
    session = event.session
    if session is None:
        raise RuntimeError(f"{event.type} event without a session")
    return session


def _event_link(event: Event) -> Link:
    """The link of a LINK_* event (proton types it Optional for all events)."""
    link = event.link
    if link is None:
        raise RuntimeError(f"{event.type} event without a link")
    return link


def _event_delivery(event: Event) -> Delivery:
    """The delivery of a DELIVERY event (proton types it Optional for all events)."""
    delivery = event.delivery
    if delivery is None:
        raise RuntimeError(f"{event.type} event without a delivery")
    return delivery


def _condition(name: str, description: str) -> Condition:
    """An AMQP error with all three fields present: pyamqp indexes ``error[2]``
    when it decodes a close/detach error, so an error without ``info`` crashes it."""
    return Condition(name, description, {symbol("x-opt-source"): "ai4s-jobq-emulator"})


def _plain_properties(annotations) -> dict | None:
    if not annotations:
        return None
    plain = {}
    for key, value in dict(annotations).items():
        if isinstance(value, (str, int, float, bool)):
            plain[str(key)] = value
    return plain or None


def _dead_letter_details(condition: Condition | None) -> tuple[str | None, str | None]:
    if condition is None:
        return None, None
    info = condition.info or {}
    reason = info.get("DeadLetterReason") if isinstance(info, dict) else None
    description = info.get("DeadLetterErrorDescription") if isinstance(info, dict) else None
    if description is None:
        description = condition.description
    return (
        str(reason) if reason is not None else None,
        str(description) if description is not None else None,
    )
