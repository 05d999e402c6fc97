"""The fast paths of building a task (``ids._plain_copy``, ``Task.args_json``) give
exactly the bytes and IDs of the general code they shortcut."""

from __future__ import annotations

import dataclasses
import json
import uuid
from datetime import datetime, timezone
from decimal import Decimal

import pytest

from ai4s_jobq import ids
from ai4s_jobq.task import Task, make_task

ARGS = [
    {"i": 17, "path": "/data/shard-00017.bin", "size": 1024},
    {"cmd": 'echo "quoted" \\ back\nslash\ttab', "env": {"Z": "1", "A": "2"}},
    {"ünïcödé": "日本語 🚀", "\u2028": "line separator", "ctl": "\x00\x1f"},
    {"nested": {"b": [1, 2.5, -0.0, 1e300, True, None], "a": {"deep": [[]]}}, "t": (1, "x")},
    {"big": 2**80, "neg": -(2**70), "f": 0.1 + 0.2, "bool": False},
    {},
]


@pytest.mark.parametrize("args", ARGS)
@pytest.mark.parametrize("options", [{}, {"num_retries": 0}, {"num_retries": 7}])
def test_the_body_is_the_envelope_encoders_output(args, options):
    task = make_task(args, deterministic=True, **options)
    assert task.args_json is not None  # the fast path is taken
    general = dataclasses.replace(task, args_json=None).to_body()
    assert task.to_body() == general
    envelope = json.loads(task.to_body())
    assert envelope["id"] == task.id == ids.content_id(task.args_json)
    assert Task.from_body(task.to_body()) == task


@pytest.mark.parametrize("args", ARGS)
def test_the_plain_fast_path_normalizes_as_the_general_walk(args):
    assert ids.normalize(args) == ids._normalize(args, "args")
    assert ids.canonical_json(ids.normalize(args)) == ids._CANONICAL.encode(
        ids._normalize(args, "args")
    )


def test_values_that_are_not_plain_json_take_the_general_walk():
    moment = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    args = {"when": moment, "id": uuid.UUID(int=1), "d": Decimal("1.50"), "s": {3, 1}}
    assert ids._plain_copy(args) is ids._NOT_PLAIN
    assert ids.normalize(args) == {
        "when": "2026-01-02T03:04:05Z",
        "id": "00000000-0000-0000-0000-000000000001",
        "d": "1.5",
        "s": [1, 3],
    }
    for bad in (float("nan"), float("inf"), {1: "int key"}, b"bytes"):
        with pytest.raises(ids.TaskEncodingError):
            ids.normalize({"x": bad})


def test_the_fast_path_copies_the_callers_containers():
    inner = [1, 2]
    outer = {"xs": inner, "d": {"k": inner}}
    task = make_task(outer, deterministic=True)
    inner.append(3)
    outer["later"] = 1
    assert task.args == {"xs": [1, 2], "d": {"k": [1, 2]}}
    assert task.args is not outer


def test_tasks_with_extra_envelope_fields_or_other_ids_use_the_encoder():
    by_keys = make_task({"a": 1, "b": 2}, dedup_keys=["a"], deterministic=True)
    explicit = make_task({"a": 1}, id="mine")
    assert by_keys.args_json is None and explicit.args_json is None
    assert json.loads(explicit.to_body())["id"] == "mine"
    extra = dataclasses.replace(make_task({"a": 1}), extra={"zz": 1, "b": 2})
    assert json.loads(extra.to_body())["zz"] == 1
    assert list(json.loads(extra.to_body())) == sorted(json.loads(extra.to_body()))
