"""Azure Service Bus backend, through the official ``azure-servicebus`` SDK (aio).

* Connecting: a connection string (its endpoint wins; the spec's QUEUE names the
  queue) or ``DefaultAzureCredential`` with the namespace's FQDN, optionally
  through another address (``JOBQ_SERVICEBUS_ENDPOINT`` / ``JOBQ_SERVICEBUS_CA``,
  see :mod:`.endpoint`).
* Queues are created on first use with duplicate detection on (see
  :mod:`.admin`), so the task ID as MessageId deduplicates pushes.
* Push fills ``ServiceBusMessageBatch``es to the link's size limit.  Service Bus
  does not tell a sender that it dropped a duplicate, so ``duplicate`` is None.
* Receive is peek-lock with a bounded prefetch; a message is settled through the
  receiver that received it.  After a failure the receiver is replaced, so a
  worker carries on when the connection drops (e.g. the broker restarts).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from azure.servicebus import (
    ServiceBusMessage,
    ServiceBusReceivedMessage,
    ServiceBusReceiveMode,
    ServiceBusSubQueue,
)
from azure.servicebus.aio import ServiceBusClient, ServiceBusReceiver, ServiceBusSender
from azure.servicebus.exceptions import (
    MessageAlreadySettled,
    MessageLockLostError,
    MessageSizeExceededError,
    MessagingEntityNotFoundError,
    ServiceBusConnectionError,
    ServiceBusError,
)
from azure.servicebus.management import ServiceBusAdministrationClient

from ..base import (
    Backend,
    BackendError,
    ConnectionFailedError,
    CredentialsRefusedError,
    DedupInfo,
    LockLostError,
    MessageTooLargeError,
    OutgoingMessage,
    PushOutcome,
    QueueCounts,
    QueueSettings,
    QueueUnavailableError,
    ReceivedMessage,
)
from .admin import AdminPlane, SyncTokenBridge, validate_settings
from .closing import close_all, quiet_close
from .endpoint import (
    EndpointOverride,
    emulator_admin_kwargs,
    endpoint_host,
    without_entity_path,
)
from .errors import _auth_failure, _reason, _short
from .messages import _body, _outgoing, _timestamp
from .senders import SenderPool

log = logging.getLogger("ai4s_jobq.servicebus")

#: longest single wait inside ``receive`` (see _ReceiverSlot.lock)
RECEIVE_SLICE = 0.25
#: how long ``clear`` waits for a batch (the counts usually end it before)
CLEAR_WAIT = 1.0
#: attempts for one batch send (the SDK retries inside each attempt too)
SEND_ATTEMPTS = 4
#: Service Bus's MessageId limit (the SDK's ``ServiceBusMessage`` checks it; see _outgoing)
MAX_MESSAGE_ID = 128
#: Azure caps DeadLetterReason/Description; keep them well inside the header limit
MAX_DEAD_LETTER_TEXT = 4096
#: SDK retry settings: fail fast enough that our own recovery (new link) kicks in; the
#: SDK retries a refused credential too, and each try costs a TLS + CBS handshake
SDK_RETRY: dict[str, Any] = {"retry_total": 1, "retry_backoff_factor": 0.5, "retry_backoff_max": 8}
#: the management client: a refused connection is a wrong endpoint, not a blip
ADMIN_RETRY: dict[str, Any] = {"retry_connect": 1, "retry_backoff_factor": 0.5}


@dataclass(eq=False)
class _ReceiverSlot:
    """A receiver and the number of its messages not settled yet."""

    receiver: ServiceBusReceiver
    #: One operation at a time per link: the SDK's reads hold the connection's socket
    #: lock for their timeout, so a settlement made while a receive waits is delayed.
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    outstanding: int = 0
    retired: bool = False
    closing: asyncio.Task[None] | None = field(default=None, repr=False)


@dataclass(eq=False)
class _Handle:
    slot: _ReceiverSlot
    message: ServiceBusReceivedMessage
    settled: bool = False


class ServiceBusBackend(Backend):
    kind = "servicebus"
    push_batch_size = 4000
    push_concurrency = 2

    def __init__(
        self,
        queue_name: str,
        *,
        namespace: str,
        connection_string: str | None = None,
        credential: Any = None,
        endpoint: EndpointOverride | None = None,
        prefetch: int = 0,
    ):
        super().__init__(queue_name)
        self.endpoint = endpoint or EndpointOverride()
        self.namespace = namespace
        self.prefetch = prefetch
        self._connection_string = connection_string
        self._credential = credential
        self._owns_credential = False
        self._client: ServiceBusClient | None = None
        self._admin: AdminPlane | None = None
        self._senders: SenderPool | None = None
        self._receivers: dict[bool, _ReceiverSlot] = {}
        self._retired: set[_ReceiverSlot] = set()
        self._closing: set[asyncio.Future[None]] = set()

    # ------------------------------------------------------------------ connecting

    @classmethod
    def from_spec(
        cls,
        namespace_fqdn: str | None,
        queue: str,
        connection_string: str | None = None,
        **options: Any,
    ) -> ServiceBusBackend:
        """``sb://NAMESPACE/QUEUE``: with a connection string its endpoint wins and
        ``queue`` names the queue; otherwise ``DefaultAzureCredential`` on the FQDN
        (reached through ``JOBQ_SERVICEBUS_ENDPOINT`` if set)."""
        if connection_string and "endpoint=sb://" in connection_string.lower():
            connection_string = without_entity_path(connection_string)
            return cls(
                queue,
                namespace=endpoint_host(connection_string),
                connection_string=connection_string,
                **options,
            )
        if connection_string:
            raise QueueUnavailableError(
                "the connection string is not a Service Bus one (it has no Endpoint=sb://...)"
            )
        if not namespace_fqdn:
            raise QueueUnavailableError("no Service Bus namespace: use sb://NAMESPACE/QUEUE")
        options.setdefault("endpoint", EndpointOverride.from_env())
        return cls(queue, namespace=namespace_fqdn, **options)

    @property
    def description(self) -> str:
        return f"sb://{self.namespace}/{self.queue_name}"

    async def open(self) -> None:
        self._senders = SenderPool(
            lambda: self.client.get_queue_sender(self.queue_name), self.push_concurrency
        )
        if self._connection_string is not None:
            cs = self._connection_string
            self._client = ServiceBusClient.from_connection_string(cs, **SDK_RETRY)
            admin = ServiceBusAdministrationClient.from_connection_string(
                cs, **ADMIN_RETRY, **emulator_admin_kwargs(cs)
            )
        else:
            if self._credential is None:
                from azure.identity.aio import DefaultAzureCredential

                self._credential = DefaultAzureCredential()
                self._owns_credential = True
            self._client = ServiceBusClient(
                self.namespace, self._credential, **SDK_RETRY, **self.endpoint.client_kwargs()
            )
            admin = ServiceBusAdministrationClient(
                self.endpoint.admin_namespace(self.namespace),
                SyncTokenBridge(self._credential, asyncio.get_running_loop()),
                **ADMIN_RETRY,
                **self.endpoint.admin_kwargs(),
            )
        self._admin = AdminPlane(admin, self.queue_name, self.description)

    async def close(self) -> None:
        await self._closed()
        slots = list(self._receivers.values()) + list(self._retired)
        self._receivers.clear()
        self._retired.clear()
        senders = await self._senders.drain() if self._senders is not None else []
        # Links first, then what they were made from (see closing.py for the grace).
        await close_all([slot.receiver for slot in slots] + senders)
        await close_all([self._client, self._admin])
        self._client = self._admin = None
        if self._owns_credential and self._credential is not None:
            await close_all([self._credential])
            self._credential = None

    @property
    def client(self) -> ServiceBusClient:
        if self._client is None:
            raise RuntimeError("backend is not open")
        return self._client

    @property
    def admin(self) -> AdminPlane:
        if self._admin is None:
            raise RuntimeError("backend is not open")
        return self._admin

    def _error(self, what: str, exc: BaseException) -> BackendError:
        if isinstance(exc, MessagingEntityNotFoundError):
            return QueueUnavailableError(f"queue {self.description} does not exist")
        refused = _auth_failure(exc)
        if refused is not None:
            return CredentialsRefusedError(
                f"{what} on {self.description} was refused (check the "
                f"credentials and their rights): {_reason(refused)}"
            )
        if isinstance(exc, (ServiceBusConnectionError, OSError)):
            return ConnectionFailedError(
                f"{what} on {self.description}: cannot connect ({_short(exc)}); check the "
                "namespace / connection string endpoint and the network"
            )
        return BackendError(f"{what} on {self.description} failed: {_short(exc)}")

    # ------------------------------------------------------------------ queue settings

    async def ensure_queue(self, settings: QueueSettings) -> None:
        validate_settings(settings)
        await self.admin.create_queue(settings)

    async def dedup_info(self) -> DedupInfo:
        return await self.admin.dedup_info()

    async def counts(self) -> QueueCounts:
        return await self.admin.counts()

    # ------------------------------------------------------------------ push

    def prepare_push(self) -> None:
        if self._senders is not None:
            self._senders.warm()

    async def _take_sender(self) -> ServiceBusSender:
        assert self._senders is not None
        return await self._senders.take()

    async def push(self, messages: Sequence[OutgoingMessage]) -> list[PushOutcome]:
        outcomes: list[PushOutcome | None] = [None] * len(messages)
        sender = await self._take_sender()
        try:
            sender = await self._push_with(sender, messages, outcomes)
        finally:
            assert self._senders is not None
            self._senders.give_back(sender)
        return [o for o in outcomes if o is not None]

    async def _push_with(
        self,
        sender: ServiceBusSender,
        messages: Sequence[OutgoingMessage],
        outcomes: list[PushOutcome | None],
    ) -> ServiceBusSender:
        batch: Any = None
        positions: list[int] = []
        index = 0
        while index < len(messages):
            message = messages[index]
            if batch is None:
                try:
                    batch, sender = await self._new_batch(sender)
                except BackendError as exc:  # cannot even open a link: the rest fails
                    for i in range(index, len(messages)):
                        outcomes[i] = PushOutcome(messages[i].message_id, None, exc)
                    return sender
            if len(message.message_id) > MAX_MESSAGE_ID:
                error = BackendError(
                    f"message ID {message.message_id[:40]!r}... is "
                    f"{len(message.message_id)} characters; Service Bus "
                    f"allows at most {MAX_MESSAGE_ID}"
                )
                outcomes[index] = PushOutcome(message.message_id, None, error)
                index += 1
                continue
            try:
                batch.add_message(_outgoing(message))
            except MessageSizeExceededError:
                if positions:  # the batch is full: send it, then retry this message
                    sender = await self._send(sender, batch, positions, messages, outcomes)
                    batch, positions = None, []
                    continue
                limit = batch.max_size_in_bytes
                self.max_message_size = limit
                error = MessageTooLargeError(message.message_id, len(message.body), limit)
                outcomes[index] = PushOutcome(message.message_id, None, error)
                index += 1
                continue
            positions.append(index)
            index += 1
        if batch is not None and positions:
            sender = await self._send(sender, batch, positions, messages, outcomes)
        return sender

    async def _new_batch(self, sender: ServiceBusSender) -> tuple[Any, ServiceBusSender]:
        for attempt in range(1, SEND_ATTEMPTS + 1):
            try:
                return await sender.create_message_batch(), sender
            except ServiceBusError as exc:
                sender = await self._replace_sender(sender, "opening a sender", exc, attempt)
        raise AssertionError("unreachable")

    async def _send(
        self,
        sender: ServiceBusSender,
        batch: Any,
        positions: list[int],
        messages: Sequence[OutgoingMessage],
        outcomes: list[PushOutcome | None],
    ) -> ServiceBusSender:
        """Send one batch, retrying transient errors (the same MessageIds make a retried
        send safe on a queue with duplicate detection)."""
        for attempt in range(1, SEND_ATTEMPTS + 1):
            try:
                await sender.send_messages(batch)
                break
            except (ServiceBusError, OSError, asyncio.TimeoutError) as exc:
                try:
                    sender = await self._replace_sender(sender, "sending", exc, attempt)
                except BackendError as final:
                    for i in positions:
                        outcomes[i] = PushOutcome(messages[i].message_id, None, final)
                    return sender
        for i in positions:
            outcomes[i] = PushOutcome(messages[i].message_id, None)
        return sender

    async def _replace_sender(
        self, sender: ServiceBusSender, what: str, exc: BaseException, attempt: int
    ) -> ServiceBusSender:
        await close_all([sender])
        fatal = isinstance(exc, MessagingEntityNotFoundError) or _auth_failure(exc) is not None
        if fatal or attempt >= SEND_ATTEMPTS:
            raise self._error(what, exc) from None
        delay = min(8.0, 0.5 * 2**attempt)
        log.warning(
            "%s to %s failed (%s); retrying in %.1fs", what, self.description, _short(exc), delay
        )
        await asyncio.sleep(delay)
        return self.client.get_queue_sender(self.queue_name)

    # ------------------------------------------------------------------ receive and settle

    def _new_receiver(self, dead_letter: bool, **kwargs: Any) -> ServiceBusReceiver:
        return self.client.get_queue_receiver(
            self.queue_name,
            sub_queue=ServiceBusSubQueue.DEAD_LETTER if dead_letter else None,
            **kwargs,
        )

    async def _slot(self, dead_letter: bool) -> _ReceiverSlot:
        slot = self._receivers.get(dead_letter)
        if slot is None:
            receiver = self._new_receiver(
                dead_letter,
                receive_mode=ServiceBusReceiveMode.PEEK_LOCK,
                prefetch_count=self.prefetch,
            )
            try:
                # Open the link now: inside receive_messages the link's opening would
                # have to fit in that call's (possibly short) wait.
                await receiver.__aenter__()
            except Exception as exc:
                await close_all([receiver])
                raise self._error("opening a receiver", exc) from None
            slot = self._receivers[dead_letter] = _ReceiverSlot(receiver)
        return slot

    def _retire(self, slot: _ReceiverSlot) -> None:
        """Stop receiving through ``slot``; keep it for settling its messages."""
        for key, current in list(self._receivers.items()):
            if current is slot:
                del self._receivers[key]
        slot.retired = True
        self._retired.add(slot)
        self._close_if_idle(slot)

    def _close_if_idle(self, slot: _ReceiverSlot) -> None:
        if slot.retired and slot.outstanding <= 0 and slot.closing is None:
            self._retired.discard(slot)
            # Closing releases messages sent against leftover credit (the detach does
            # that; close_all does not wait out the SDK's keep-alive after it).
            slot.closing = closing = asyncio.ensure_future(close_all([slot.receiver]))
            self._closing.add(closing)
            closing.add_done_callback(self._closing.discard)

    async def _closed(self) -> None:
        """Wait for retired receivers to finish closing (their released messages are
        then receivable again)."""
        if self._closing:
            await asyncio.wait(list(self._closing))

    async def receive(
        self, max_count: int, max_wait: float, *, dead_letter: bool = False
    ) -> list[ReceivedMessage]:
        if max_count <= 0:
            return []
        if dead_letter and not await self._may_hold_messages(dead_letter=True):
            return []  # the dead-letter tools' last round: no link to open, no wait
        await self._closed()
        slot = await self._slot(dead_letter)
        deadline = time.monotonic() + max_wait
        try:
            while True:
                # Wait in short slices, so settlements and renewals queued on the
                # link's lock get through while the queue is empty.
                async with slot.lock:
                    wait = min(RECEIVE_SLICE, deadline - time.monotonic())
                    received = await slot.receiver.receive_messages(
                        max_message_count=max_count, max_wait_time=max(wait, 0.05)
                    )
                if received or time.monotonic() >= deadline:
                    break
        except Exception as exc:
            self._retire(slot)  # the next receive opens a fresh link (reconnects)
            raise self._error("receiving", exc) from None
        slot.outstanding += len(received)
        if dead_letter:
            # Dead-letter tools take one batch at a time: a link per batch leaves no
            # credit behind that would lock more dead letters than they asked for.
            self._retire(slot)
        return [self._to_received(m, slot) for m in received]

    def _to_received(
        self, message: ServiceBusReceivedMessage, slot: _ReceiverSlot | None
    ) -> ReceivedMessage:
        # The SDK exposes the AMQP header's delivery-count, which Service Bus sets to
        # DeliveryCount - 1 on a received message (0 on the first delivery); peeked
        # messages carry DeliveryCount itself.
        raw_count = message.delivery_count or 0
        return ReceivedMessage(
            message_id=str(message.message_id or ""),
            body=_body(message),
            delivery_count=raw_count + 1 if slot is not None else raw_count,
            enqueued_time=_timestamp(message.enqueued_time_utc),
            locked_until=_timestamp(message.locked_until_utc) if slot is not None else None,
            handle=_Handle(slot, message) if slot is not None else None,
            dead_letter_reason=message.dead_letter_reason,
            dead_letter_description=message.dead_letter_error_description,
            sequence_number=message.sequence_number,
        )

    def lock_renew_interval(self, message: ReceivedMessage) -> float:
        interval = super().lock_renew_interval(message)
        lock = self._admin.lock_duration if self._admin is not None else None
        if lock is not None:  # guards against a client clock running behind the broker's
            interval = min(interval, max(0.05, lock.total_seconds() / 3))
        return interval

    async def renew(self, message: ReceivedMessage) -> None:
        handle: _Handle = message.handle
        try:
            async with handle.slot.lock:
                until = await handle.slot.receiver.renew_message_lock(handle.message)
        except (MessageLockLostError, MessageAlreadySettled) as exc:
            raise LockLostError(
                f"lock on message {message.message_id} lost: {_short(exc)}"
            ) from None
        except ValueError as exc:  # the receiver was shut down
            raise LockLostError(
                f"lock on message {message.message_id} lost: {_short(exc)}"
            ) from None
        except Exception as exc:
            raise self._error("renewing a lock", exc) from None
        message.locked_until = _timestamp(until) if until is not None else message.locked_until

    async def _settle(self, message: ReceivedMessage, action: str, **kwargs: Any) -> None:
        handle: _Handle = message.handle
        receiver = handle.slot.receiver
        try:
            async with handle.slot.lock:
                await getattr(receiver, action)(handle.message, **kwargs)
        except (MessageLockLostError, MessageAlreadySettled, ValueError) as exc:
            self._settled(handle)
            raise LockLostError(
                f"lock on message {message.message_id} lost: {_short(exc)}"
            ) from None
        except Exception as exc:
            raise self._error(action.replace("_", " "), exc) from None
        self._settled(handle)

    def _settled(self, handle: _Handle) -> None:
        if not handle.settled:
            handle.settled = True
            handle.slot.outstanding -= 1
            self._close_if_idle(handle.slot)

    async def complete(self, message: ReceivedMessage) -> None:
        await self._settle(message, "complete_message")

    async def abandon(self, message: ReceivedMessage) -> None:
        await self._settle(message, "abandon_message")

    async def dead_letter(self, message: ReceivedMessage, reason: str, description: str) -> None:
        await self._settle(
            message,
            "dead_letter_message",
            reason=(reason or "")[:MAX_DEAD_LETTER_TEXT],
            error_description=(description or "")[-MAX_DEAD_LETTER_TEXT:],
        )

    async def send_scheduled(self, message: OutgoingMessage, delay: float) -> None:
        """A scheduled message (``ScheduledEnqueueTimeUtc``) for a delayed retry; the
        queue's duplicate detection applies to it as to any send."""
        outgoing = ServiceBusMessage(message.body, message_id=message.message_id)
        if delay > 0:
            outgoing.scheduled_enqueue_time_utc = datetime.now(timezone.utc) + timedelta(
                seconds=delay
            )
        sender = await self._take_sender()
        try:
            await sender.send_messages(outgoing)
        except Exception as exc:
            await quiet_close(sender)
            sender = self.client.get_queue_sender(self.queue_name)
            raise self._error("rescheduling a task", exc) from None
        finally:
            assert self._senders is not None
            self._senders.give_back(sender)

    # ------------------------------------------------------------------ inspect and clear

    async def peek(self, max_count: int, *, dead_letter: bool = False) -> list[ReceivedMessage]:
        await self._closed()
        found: list[ReceivedMessage] = []
        receiver = self._new_receiver(dead_letter)
        try:
            await receiver.__aenter__()  # opening, not bounded by an operation's wait
            next_sequence = 0
            while len(found) < max_count:
                batch = await receiver.peek_messages(
                    max_message_count=max_count - len(found), sequence_number=next_sequence
                )
                if not batch:
                    break
                found.extend(self._to_received(m, None) for m in batch)
                next_sequence = (batch[-1].sequence_number or 0) + 1
        except ServiceBusError as exc:
            raise self._error("peeking", exc) from None
        finally:
            await close_all([receiver])
        return found

    async def clear(self, *, dead_letter: bool = False) -> int:
        """Receive-and-delete until the queue is empty.  The runtime counts say when it
        is, so the last round does not have to wait out an empty receive."""
        await self._closed()
        deleted = 0
        receiver = self._new_receiver(
            dead_letter, receive_mode=ServiceBusReceiveMode.RECEIVE_AND_DELETE, prefetch_count=0
        )
        try:
            await receiver.__aenter__()  # not inside receive_messages' short wait
            while await self._may_hold_messages(dead_letter):
                batch = await receiver.receive_messages(
                    max_message_count=500, max_wait_time=CLEAR_WAIT
                )
                if not batch:
                    break
                deleted += len(batch)
        except ServiceBusError as exc:
            raise self._error("clearing", exc) from None
        finally:
            await close_all([receiver])
        return deleted

    async def _may_hold_messages(self, dead_letter: bool) -> bool:
        """False only when the runtime counts say the (dead-letter) queue is empty."""
        try:
            counts = await self.admin.counts()
        except BackendError:  # e.g. no Manage rights: an empty receive has to tell
            return True
        return (counts.dead_letter if dead_letter else counts.active) > 0

    def extra_info(self) -> dict[str, Any]:
        return {
            "namespace": self.namespace,
            "prefetch": self.prefetch,
            "auth": "connection string" if self._connection_string else "Azure AD",
        }
