"""Redaction: every form of every secret, and secrets by shape, whatever was registered."""

from __future__ import annotations

import base64
import io
import json
import logging
from collections.abc import Iterator
from urllib.parse import quote, quote_plus

import pytest
import structlog

from worker import logs
from worker.config import load_settings
from worker.logs import REDACTED, configure_logging, redact, scrub

SECRET = "pg:SECRET/x%y&z"
TOKEN = "tok-SECRET-auth"
KEY = "key-SECRET-api"


@pytest.fixture(autouse=True)
def logging_restored(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """These tests configure logging; the session's set-up comes back after each."""
    root = logging.getLogger()
    handlers, level, config = root.handlers[:], root.level, structlog.get_config()
    monkeypatch.setattr(logs, "_secrets", ())
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    structlog.configure(**config)


@pytest.fixture
def registered() -> list[str]:
    env = {
        "DATABASE_URL": f"postgresql://me:{quote(SECRET, safe='')}@db/x?password={quote(SECRET)}",
        "TWILIO_API_KEY_SID": "SK" + "1" * 32,
        "TWILIO_API_KEY_SECRET": KEY,
        "TWILIO_ACCOUNT_SID": "AC" + "2" * 32,
        "TWILIO_AUTH_TOKEN": TOKEN,  # set beside the API key: unused, still a secret
    }
    secrets = list(load_settings(env).secrets())
    configure_logging("info", "json", secrets, stream=io.StringIO())
    return secrets


@pytest.mark.parametrize(
    "form",
    [
        SECRET,
        quote(SECRET, safe=""),
        quote(SECRET),
        quote_plus(SECRET),
        json.dumps(SECRET)[1:-1],
        TOKEN,
        KEY,
        base64.b64encode(f"{'SK' + '1' * 32}:{KEY}".encode()).decode(),
        base64.b64encode(f"{'AC' + '2' * 32}:{TOKEN}".encode()).decode(),
    ],
)
def test_every_form_of_every_registered_secret_is_redacted(
    registered: list[str], form: str
) -> None:
    text = redact(f"before {form} after")
    assert text == f"before {REDACTED} after"


@pytest.mark.parametrize(
    ("text", "kept"),
    [
        ("Authorization: Basic QUMxMjM0NTY3ODkwYWJjZGVmOnNlY3JldA==", "Authorization: Basic "),
        ("got bearer abcdefghijklmnopqrstuvwxyz.123", "got bearer "),
        ("postgresql://user:hunter2@db:5432/x", "postgresql://user:"),
        ("?sslmode=require&password=hunter2&x=1", "?sslmode=require&password="),
        ("host=db password=hunter2 dbname=x", "host=db password="),
    ],
)
def test_secrets_by_shape_are_redacted_unregistered(text: str, kept: str) -> None:
    redacted = redact(text)
    assert "hunter2" not in redacted
    assert "QUMxMjM0NTY3ODkwYWJjZGVmOnNlY3JldA" not in redacted
    assert "abcdefghijklmnopqrstuvwxyz" not in redacted
    assert redacted.startswith(kept), redacted
    assert REDACTED in redacted


def test_plain_words_are_kept() -> None:
    for text in ("Basic auth failed", "http://host:8080/path", "no password here"):
        assert redact(text) == text


def test_log_lines_and_printed_values_are_scrubbed(registered: list[str]) -> None:
    stream = io.StringIO()
    configure_logging("info", "json", registered, stream=stream)
    structlog.get_logger("t").error("boom", error=f"echo {TOKEN}", nested={"a": [KEY]})
    logging.getLogger("asyncpg").warning("dsn password=%s", SECRET)
    out = stream.getvalue()
    for secret in (TOKEN, KEY, SECRET, quote(SECRET, safe="")):
        assert secret not in out
    assert scrub({"rows": [{"error": f"x {TOKEN}"}], "n": 3}) == {
        "rows": [{"error": f"x {REDACTED}"}],
        "n": 3,
    }
