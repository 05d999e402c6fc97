"""Management front end (sync ServiceBusAdministrationClient over HTTPS), the
connection-string/CA rule, the subprocess form and the ``jobq emulator`` command."""

from __future__ import annotations

import datetime
import ssl
import urllib.request

import pytest
from azure.core.exceptions import (
    ClientAuthenticationError,
    HttpResponseError,
    ResourceExistsError,
    ResourceNotFoundError,
)
from azure.servicebus import ServiceBusClient, ServiceBusMessage
from azure.servicebus.management import ServiceBusAdministrationClient

from ai4s_jobq.emulator.client import (
    admin_client_kwargs,
    ca_path_for,
    emulator_endpoint,
    is_emulator_connection_string,
)

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def sb(sb_emulator_shared):
    return sb_emulator_shared


def test_create_get_update_list_delete_queue(sb):
    with sb.admin() as admin:
        created = admin.create_queue(
            "admin-q",
            lock_duration=datetime.timedelta(seconds=45),
            requires_duplicate_detection=True,
            duplicate_detection_history_time_window=datetime.timedelta(minutes=2),
            max_delivery_count=6,
            default_message_time_to_live=datetime.timedelta(hours=3),
            max_message_size_in_kilobytes=512,
        )
        fetched = admin.get_queue("admin-q")
        for props in (created, fetched):
            assert props.name == "admin-q"
            assert props.lock_duration == datetime.timedelta(seconds=45)
            assert props.requires_duplicate_detection is True
            assert props.duplicate_detection_history_time_window == datetime.timedelta(minutes=2)
            assert props.max_delivery_count == 6
            assert props.default_message_time_to_live == datetime.timedelta(hours=3)
            assert props.max_message_size_in_kilobytes == 512
        assert sb.server.core.get_queue("admin-q").max_message_size == 512 * 1024

        fetched.lock_duration = datetime.timedelta(seconds=20)
        fetched.max_delivery_count = 2
        admin.update_queue(fetched)
        updated = admin.get_queue("admin-q")
        assert (updated.lock_duration, updated.max_delivery_count) == (
            datetime.timedelta(seconds=20),
            2,
        )

        with pytest.raises(ResourceExistsError):
            admin.create_queue("admin-q")
        assert "admin-q" in [q.name for q in admin.list_queues()]
        admin.delete_queue("admin-q")
        assert "admin-q" not in [q.name for q in admin.list_queues()]
        with pytest.raises(ResourceNotFoundError):
            admin.get_queue("admin-q")
        with pytest.raises(ResourceNotFoundError):
            admin.delete_queue("admin-q")


def test_list_queues_pages_through_many_queues(sb):
    names = {sb.create_queue(f"page-{i:03d}") for i in range(7)}
    with sb.admin() as admin:
        listed = [q.name for q in admin.list_queues(max_page_size=3)]
    assert names <= set(listed)
    assert len(listed) == len(set(listed))


def test_runtime_properties_count_active_dead_letter_and_scheduled(sb):
    queue = sb.create_queue()
    with ServiceBusClient.from_connection_string(sb.connection_string) as client:
        with client.get_queue_sender(queue) as sender:
            sender.send_messages([ServiceBusMessage(f"m{i}") for i in range(4)])
            later = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(hours=1)
            sender.schedule_messages([ServiceBusMessage("s1"), ServiceBusMessage("s2")], later)
        with client.get_queue_receiver(queue) as receiver:
            [message] = receiver.receive_messages(max_wait_time=5)
            receiver.dead_letter_message(message, reason="test")
    with sb.admin() as admin:
        runtime = admin.get_queue_runtime_properties(queue)
        assert runtime.active_message_count == 3
        assert runtime.dead_letter_message_count == 1
        assert runtime.scheduled_message_count == 2
        assert runtime.total_message_count == 6
        listed = {r.name: r for r in admin.list_queues_runtime_properties()}
        assert listed[queue].active_message_count == 3


def test_update_toggling_duplicate_detection_is_rejected(sb):
    queue = sb.create_queue(requires_duplicate_detection=True)
    with sb.admin() as admin:
        props = admin.get_queue(queue)
        props.requires_duplicate_detection = False
        with pytest.raises(HttpResponseError) as info:
            admin.update_queue(props)
        assert info.value.status_code == 400
        assert admin.get_queue(queue).requires_duplicate_detection is True


def test_bad_requests_get_http_errors(sb):
    with sb.admin() as admin:
        with pytest.raises(HttpResponseError) as info:
            admin.create_queue("sessions", requires_session=True)
        assert info.value.status_code == 400
        with pytest.raises(HttpResponseError):
            admin.create_queue("too-long-lock", lock_duration=datetime.timedelta(minutes=10))
    # a hand-made request with a malformed body and no SAS token
    context = ssl.create_default_context(cafile=str(sb.ca_path))
    url = f"https://{sb.host}:{sb.port}/broken"
    request = urllib.request.Request(url, data=b"<entry><content>", method="PUT")
    with pytest.raises(urllib.error.HTTPError) as unauthorised:
        urllib.request.urlopen(request, context=context, timeout=5)
    assert unauthorised.value.code == 401
    assert sb.server.settings.key not in unauthorised.value.read().decode()


def test_wrong_key_gets_authentication_error(sb):
    key = sb.server.settings.key
    wrong = sb.connection_string.replace(key, ("B" if key[0] != "B" else "C") + key[1:])
    with ServiceBusAdministrationClient.from_connection_string(
        wrong, **admin_client_kwargs(wrong)
    ) as admin:
        with pytest.raises(ClientAuthenticationError) as info:
            admin.list_queues().next()
    assert key not in str(info.value)


def test_connection_string_rule():
    azure = "Endpoint=sb://ns.servicebus.windows.net/;SharedAccessKeyName=k;SharedAccessKey=abc="
    assert admin_client_kwargs(azure) == {}
    assert not is_emulator_connection_string(azure)
    local = (
        "Endpoint=sb://127.0.0.1:1;SharedAccessKeyName=k;SharedAccessKey=abc=;"
        "UseDevelopmentEmulator=true"
    )
    assert emulator_endpoint(local) == ("127.0.0.1", 1)
    assert is_emulator_connection_string(local)
    if not ca_path_for("127.0.0.1", 1).exists():
        with pytest.raises(FileNotFoundError):
            admin_client_kwargs(local)


def test_admin_client_kwargs_point_at_the_ca_the_emulator_wrote(sb):
    kwargs = admin_client_kwargs(sb.connection_string)
    assert kwargs == {"connection_verify": str(ca_path_for(sb.host, sb.port))}
    with open(kwargs["connection_verify"]) as f:
        assert "BEGIN CERTIFICATE" in f.read()


def test_subprocess_kill_and_restart_keep_port_key_and_messages(sb_emulator_process):
    sb = sb_emulator_process
    queue = sb.create_queue()
    connection_string = sb.connection_string
    with ServiceBusClient.from_connection_string(connection_string) as client:
        with client.get_queue_sender(queue) as sender:
            sender.send_messages(ServiceBusMessage("survives", message_id="s"))
    sb.kill()  # SIGKILL: no clean shutdown
    sb.process.start()
    assert sb.connection_string == connection_string
    with ServiceBusClient.from_connection_string(connection_string) as client:
        with client.get_queue_receiver(queue) as receiver:
            [message] = receiver.receive_messages(max_wait_time=5)
            assert (message.message_id, str(message)) == ("s", "survives")
            receiver.complete_message(message)
    sb.restart()
    with sb.admin() as admin:
        assert admin.get_queue_runtime_properties(queue).total_message_count == 0


def test_jobq_emulator_command_prints_the_connection_string(tmp_path):
    import subprocess
    import sys

    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from ai4s_jobq_cli.emulator_cmd import emulator; emulator()",
            "--port",
            "0",
            "--data",
            str(tmp_path / "data"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith("Endpoint=sb://127.0.0.1:")
        assert "UseDevelopmentEmulator=true" in line
        host, port = emulator_endpoint(line)
        with ServiceBusAdministrationClient.from_connection_string(
            line.strip(), **admin_client_kwargs(line.strip())
        ) as admin:
            admin.create_queue("from-cli")
    finally:
        proc.terminate()
        assert proc.wait(10) == 0  # SIGTERM is a clean stop
        proc.stdout.close()
        proc.stderr.close()


def test_jobq_emulator_on_a_port_in_use_says_so_and_exits_4(tmp_path):
    import socket

    from conftest import jobq_cli

    with socket.socket() as taken:  # a port another program listens on
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = jobq_cli("emulator", "--port", str(port), "--data", str(tmp_path / "d"))
    assert result.returncode == 4, result.stderr
    assert f"cannot listen on 127.0.0.1:{port}: the port is in use" in result.stderr
    assert "Traceback" not in result.stderr


def test_jobq_emulator_with_damaged_settings_says_which_file_and_exits_4(tmp_path):
    from conftest import jobq_cli

    data = tmp_path / "data"
    data.mkdir()
    for damage in ('{"port": 5672, "key": ', '["a list"]', '{"port": "x"}', b"\xff\xfe"):
        settings = data / "emulator.json"
        if isinstance(damage, bytes):
            settings.write_bytes(damage)
        else:
            settings.write_text(damage)
        result = jobq_cli("emulator", "--port", "0", "--data", str(data))
        assert result.returncode == 4, result.stderr
        assert f"settings file {settings} is damaged" in result.stderr
        assert "Traceback" not in result.stderr
        assert settings.read_bytes() == (damage if isinstance(damage, bytes) else damage.encode())


def test_jobq_emulator_with_a_damaged_message_store_says_so_and_exits_4(tmp_path):
    from conftest import jobq_cli

    from ai4s_jobq.broker_core import BrokerCore

    data = tmp_path / "data"
    data.mkdir()
    store = data / "broker.sqlite3"
    BrokerCore(store).close()
    with open(store, "r+b") as file:  # page 1 after the header: the schema
        file.seek(100)
        file.write(b"\xff" * 3000)
    result = jobq_cli("emulator", "--port", "0", "--data", str(data))
    assert result.returncode == 4, result.stderr
    assert f"message store {store} is damaged" in result.stderr
    assert "Traceback" not in result.stderr
