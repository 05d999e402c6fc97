"""Baseline throughput of the raw azure-servicebus SDK against the local emulator.

    python bench/bench_emulator.py [--messages N]

Starts the emulator as a subprocess (so client and broker do not share a GIL),
then measures, on one queue with duplicate detection on (as the Service Bus
backend uses it):

* one-by-one sends: ``sender.send_messages(msg)`` per message;
* batch sends: ``ServiceBusMessageBatch`` filled to the size limit;
* receive + complete: peek-lock receiver with prefetch, completing each message.

Prints messages/s for each and the ratios.  These are the figures the Service
Bus backend is measured against.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import uuid

from azure.servicebus import ServiceBusClient, ServiceBusMessage
from bytecode import ensure_bytecode

from ai4s_jobq.emulator.process import EmulatorProcess

BODY = b'{"task": "' + b"x" * 200 + b'"}'


def _queue(emulator: EmulatorProcess) -> str:
    from azure.servicebus.management import ServiceBusAdministrationClient

    from ai4s_jobq.emulator.client import admin_client_kwargs

    cs = emulator.connection_string
    name = f"bench-{uuid.uuid4().hex[:8]}"
    with ServiceBusAdministrationClient.from_connection_string(
        cs, **admin_client_kwargs(cs)
    ) as admin:
        admin.create_queue(name, requires_duplicate_detection=True)
    return name


def send_one_by_one(client: ServiceBusClient, queue: str, count: int) -> float:
    with client.get_queue_sender(queue) as sender:
        sender.send_messages(ServiceBusMessage(BODY))  # link warm-up, not timed
        start = time.perf_counter()
        for _ in range(count):
            sender.send_messages(ServiceBusMessage(BODY, message_id=uuid.uuid4().hex))
        return time.perf_counter() - start


def send_batches(client: ServiceBusClient, queue: str, count: int) -> tuple[float, int]:
    batches = 0
    with client.get_queue_sender(queue) as sender:
        sender.send_messages(ServiceBusMessage(BODY))
        start = time.perf_counter()
        sent = 0
        while sent < count:
            batch = sender.create_message_batch()
            while sent < count:
                try:
                    batch.add_message(ServiceBusMessage(BODY, message_id=uuid.uuid4().hex))
                except ValueError:  # MessageSizeExceededError: the batch is full
                    break
                sent += 1
            sender.send_messages(batch)
            batches += 1
        return time.perf_counter() - start, batches


def receive_and_complete(client: ServiceBusClient, queue: str, count: int) -> float:
    done = 0
    with client.get_queue_receiver(queue, prefetch_count=100) as receiver:
        start = time.perf_counter()
        while done < count:
            # ask for exactly what is left: receive_messages waits out max_wait_time
            # when fewer than max_message_count messages exist
            messages = receiver.receive_messages(
                max_message_count=min(100, count - done), max_wait_time=5
            )
            if not messages:
                break
            for message in messages:
                receiver.complete_message(message)
            done += len(messages)
        elapsed = time.perf_counter() - start
    if done < count:
        raise SystemExit(f"only received {done} of {count} messages")
    return elapsed


def main() -> None:
    ensure_bytecode()  # see bench/bytecode.py
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--messages",
        type=int,
        default=1000,
        help="messages per measurement (one-by-one uses a fifth)",
    )
    args = parser.parse_args()
    single_count = max(args.messages // 5, 50)
    with tempfile.TemporaryDirectory() as data, EmulatorProcess(data) as emulator:
        queue = _queue(emulator)
        with ServiceBusClient.from_connection_string(emulator.connection_string) as client:
            single = send_one_by_one(client, queue, single_count)
            batch, batches = send_batches(client, queue, args.messages)
            total = single_count + args.messages + 2  # + the two warm-up messages
            receive = receive_and_complete(client, queue, total)
    single_rate = single_count / single
    batch_rate = args.messages / batch
    receive_rate = total / receive
    print(f"one-by-one send : {single_rate:8.0f} msg/s  ({single_count} messages, {single:.2f} s)")
    print(
        f"batch send      : {batch_rate:8.0f} msg/s  ({args.messages} messages in {batches} "
        f"batches, {batch:.2f} s)"
    )
    print(f"receive+complete: {receive_rate:8.0f} msg/s  ({total} messages, {receive:.2f} s)")
    print(f"batch / one-by-one send     : {batch_rate / single_rate:6.1f}x")
    print(f"receive+complete / one-by-one: {receive_rate / single_rate:6.1f}x")


if __name__ == "__main__":
    main()
