"""Deterministic task IDs: golden vectors, canonical encoding, the env toggle."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import uuid
from collections import OrderedDict
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal

import pytest

from ai4s_jobq.ids import (
    ConfigError,
    TaskEncodingError,
    deterministic_ids_enabled,
    identify,
)
from ai4s_jobq.task import Task, make_task

GOLDEN = [
    ({"cmd": "echo hello"}, '{"cmd":"echo hello"}', "39efe3ac3ce0f83aa90079cc18e125fd"),
    (
        {"cmd": "python train.py --lr 0.1", "env": {"SEED": "1", "CUDA": "0"}},
        '{"cmd":"python train.py --lr 0.1","env":{"CUDA":"0","SEED":"1"}}',
        "c6c973529f3d42868175ac50ee456be7",
    ),
    (
        {"b": 2, "a": 1, "nested": {"z": [1, 2.5, None, True], "y": "é✓"}},
        '{"a":1,"b":2,"nested":{"y":"é✓","z":[1,2.5,null,true]}}',
        "0a506abf45645b29fc4337985a494086",
    ),
    (
        {
            "when": datetime(2024, 1, 2, 3, 4, 5, 600000, tzinfo=timezone(timedelta(hours=2))),
            "day": date(2024, 2, 29),
        },
        '{"day":"2024-02-29","when":"2024-01-02T01:04:05.600000Z"}',
        "52b72c3f0566d1c6a9acdd55ce24e86e",
    ),
    (
        {
            "u": uuid.UUID("12345678-1234-5678-1234-567812345678"),
            "d": Decimal("1.50"),
            "t": (1, 2),
            "s": {3, 1, 2},
        },
        '{"d":"1.5","s":[1,2,3],"t":[1,2],"u":"12345678-1234-5678-1234-567812345678"}',
        "fda83195c363c96b9a12c782a4d7fdb2",
    ),
]


@pytest.mark.parametrize("args, canonical, expected_id", GOLDEN)
def test_golden_vectors(args, canonical, expected_id):
    identified = identify(args, deterministic=True)
    assert identified.hashed == canonical
    assert identified.id == expected_id
    # The ID is the MD5 of exactly the canonical UTF-8 bytes.
    assert hashlib.md5(canonical.encode("utf-8")).hexdigest() == expected_id


def test_key_order_does_not_matter():
    a = {"x": 1, "y": {"p": [1, 2], "q": "s"}}
    b = OrderedDict([("y", OrderedDict([("q", "s"), ("p", [1, 2])])), ("x", 1)])
    assert identify(a, deterministic=True).id == identify(b, deterministic=True).id


def test_different_content_different_id():
    assert identify({"x": 1}, deterministic=True).id != identify({"x": 2}, deterministic=True).id
    # Types matter: the integer 1 and the string "1" are different work.
    assert identify({"x": 1}, deterministic=True).id != identify({"x": "1"}, deterministic=True).id


def test_same_id_in_another_process_with_other_hash_seed():
    code = (
        "import json,sys; from ai4s_jobq.ids import identify;"
        "print(identify(json.loads(sys.argv[1]), deterministic=True).id)"
    )
    args = {"s": "x", "k": [3, 2, 1], "d": {"b": 1, "a": 2}}
    ids = set()
    for seed in ("1", "2", "random"):
        out = subprocess.run(
            [sys.executable, "-c", code, json.dumps(args)],
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            check=True,
        )
        ids.add(out.stdout.strip())
    assert ids == {identify(args, deterministic=True).id}


def test_set_order_is_canonical():
    many = {f"item-{i}" for i in range(50)}
    assert identify({"s": many}, deterministic=True).hashed == json.dumps(
        {"s": sorted(many)}, separators=(",", ":")
    )


def test_datetime_same_instant_same_id():
    utc = datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc)
    paris = utc.astimezone(timezone(timedelta(hours=2)))
    assert (
        identify({"t": utc}, deterministic=True).id == identify({"t": paris}, deterministic=True).id
    )


def test_decimal_normalization():
    assert identify({"d": Decimal("100")}, deterministic=True).hashed == '{"d":"100"}'
    assert identify({"d": Decimal("-0.000")}, deterministic=True).hashed == '{"d":"0"}'


@pytest.mark.parametrize(
    "args, fragment",
    [
        ({"when": datetime(2024, 1, 1)}, "args.when: naive datetime"),
        ({"blob": b"abc"}, "args.blob: values of type bytes"),
        ({"x": {"y": [1, float("nan")]}}, "args.x.y[1]"),
        ({"obj": object()}, "args.obj: values of type object"),
        ({"m": {1: "a"}}, "args.m: key 1 is a int"),
        ({"d": Decimal("Infinity")}, "args.d"),
    ],
)
def test_values_without_deterministic_encoding_are_rejected(args, fragment):
    with pytest.raises(TaskEncodingError) as info:
        identify(args, deterministic=True)
    assert fragment in str(info.value)


@pytest.mark.parametrize(
    "value, expected",
    [
        (None, True),
        ("", True),
        ("1", True),
        ("TRUE", True),
        ("Yes", True),
        ("0", False),
        ("false", False),
        ("NO", False),
        ("off", False),
    ],
)
def test_env_toggle_values(value, expected):
    environ = {} if value is None else {"JOBQ_DETERMINISTIC_IDS": value}
    assert deterministic_ids_enabled(environ) is expected


def test_env_toggle_rejects_garbage():
    with pytest.raises(ConfigError, match="JOBQ_DETERMINISTIC_IDS='maybe'"):
        deterministic_ids_enabled({"JOBQ_DETERMINISTIC_IDS": "maybe"})


def test_env_toggle_is_read_at_push_time(monkeypatch):
    monkeypatch.setenv("JOBQ_DETERMINISTIC_IDS", "false")
    first, second = make_task("echo hi"), make_task("echo hi")
    assert first.id != second.id
    assert len(first.id) == 32 and int(first.id, 16) >= 0  # uuid4 hex
    monkeypatch.setenv("JOBQ_DETERMINISTIC_IDS", "true")
    assert make_task("echo hi").id == make_task("echo hi").id
    # A per-call override beats the environment.
    assert make_task("echo hi", deterministic=False).id != make_task("echo hi").id


def test_explicit_id_overrides_content():
    task = make_task({"x": 1}, id="my-key")
    assert task.id == "my-key"
    with pytest.raises(ValueError, match="non-empty"):
        make_task({"x": 1}, id="  ")
    with pytest.raises(ValueError, match="at most 128"):
        make_task({"x": 1}, id="k" * 129)
    assert make_task({"x": 1}, id="k" * 128).id == "k" * 128


def test_dedup_keys_hash_only_those_arguments():
    a = make_task({"url": "https://x", "attempt_note": "first"}, dedup_keys=["url"])
    b = make_task({"url": "https://x", "attempt_note": "second"}, dedup_keys=["url"])
    c = make_task({"url": "https://y", "attempt_note": "first"}, dedup_keys=["url"])
    assert a.id == b.id != c.id
    assert a.args["attempt_note"] == "first"  # the whole task is still delivered
    with pytest.raises(ValueError, match="not arguments of this task"):
        make_task({"url": "x"}, dedup_keys=["nope"])


def test_retry_budget_is_not_part_of_identity():
    assert make_task("echo hi", num_retries=0).id == make_task("echo hi", num_retries=5).id


def test_envelope_round_trip():
    task = make_task({"x": [1, 2]}, num_retries=4)
    assert Task.from_body(task.to_body()) == task


def test_wire_args_are_the_hashed_text():
    task = make_task({"b": 1, "a": {"d": 2, "c": 3}})
    body = task.to_body().decode("utf-8")
    hashed = identify({"b": 1, "a": {"d": 2, "c": 3}}, deterministic=True).hashed
    assert f'"args":{hashed}' in body
