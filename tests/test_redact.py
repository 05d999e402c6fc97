"""Secrets never reach logs or errors: what :func:`redact` removes, and what it keeps."""

from __future__ import annotations

import base64
import json

import pytest

from ai4s_jobq.redact import redact


def _jwt() -> str:
    def part(value: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")

    return f"{part({'alg': 'HS256', 'typ': 'JWT'})}.{part({'aud': 'x', 'exp': 1})}.c2lnbmF0dXJl"


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        ("Endpoint=sb://ns/;SharedAccessKeyName=root;SharedAccessKey=abc123=;", "abc123="),
        ("DefaultEndpointsProtocol=https;AccountName=a;AccountKey=Zm9vYmFy==;", "Zm9vYmFy=="),
        ("GET https://a.queue.core.windows.net/q?sv=2021&sig=s3cr%2Bet&se=1", "s3cr%2Bet"),
        ("Authorization: Bearer abc.def.ghi", "abc.def.ghi"),
        (f"token {_jwt()} was refused", _jwt()),
        (f"CBS put-token failed for {_jwt()}", _jwt().split(".")[1]),
    ],
)
def test_secrets_are_removed(text: str, secret: str) -> None:
    cleaned = redact(text)
    assert secret not in cleaned
    assert "***" in cleaned


def test_ordinary_text_is_kept() -> None:
    text = "task 9f86d081884c7d65 failed: exit code 1 (eyJ alone is not a token)"
    assert redact(text) == text
