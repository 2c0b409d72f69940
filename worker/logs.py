"""structlog set-up: JSON lines off a TTY, a readable console on one, secrets redacted.

Redaction is one policy, ``redact``: every registered secret in every form it can take in a
message (as given, URL-encoded, URL-decoded, JSON-escaped), plus what is a secret whatever its
value (an ``Authorization`` value, a URL's password, a ``password=`` parameter).
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Iterable, MutableMapping
from typing import Any
from urllib.parse import quote, quote_plus, unquote, unquote_plus

import structlog

REDACTED = "[redacted]"
_secrets: tuple[str, ...] = ()
# Secret by shape: a Basic/Bearer credential, the password in a URL's user info, a password
# parameter (URL query or libpq key=value).
_SHAPES = re.compile(
    r"(?P<scheme>\b(?:basic|bearer)\s+)[A-Za-z0-9+/._~-]{16,}=*"
    r"|(?P<userinfo>\b[a-z][a-z0-9+.-]*://[^\s:/?#@]*:)[^\s@/]*@"
    r"|(?P<param>\b(?:ssl)?password=)[^\s&#'\"]+",
    re.IGNORECASE,
)


def _shape(match: re.Match[str]) -> str:
    prefix = match.group("scheme") or match.group("param")
    if prefix:
        return prefix + REDACTED
    return f"{match.group('userinfo')}{REDACTED}@"


def secret_forms(secrets: Iterable[str]) -> tuple[str, ...]:
    """Each secret as it may appear in text, longest first (so no form is left half-replaced)."""
    forms: set[str] = set()
    for secret in secrets:
        if not secret:
            continue
        for plain in (secret, unquote(secret), unquote_plus(secret)):
            forms.update(
                (plain, quote(plain, safe=""), quote(plain), quote_plus(plain), _json_inner(plain))
            )
    return tuple(sorted((f for f in forms if f), key=len, reverse=True))


def _json_inner(text: str) -> str:
    return json.dumps(text)[1:-1]


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with every registered secret (and ``secrets``) replaced, in every form."""
    extra = secret_forms(secrets) if secrets else ()
    for form in (*extra, *_secrets) if extra else _secrets:
        if form in text:
            text = text.replace(form, REDACTED)
    return _SHAPES.sub(_shape, text)


def scrub(value: Any) -> Any:
    """``value`` with every string inside it redacted (for anything printed)."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: scrub(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [scrub(v) for v in value]
    if isinstance(value, BaseException):
        return redact(f"{type(value).__name__}: {value}")
    return value


def _redact_secrets(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    return {k: scrub(v) for k, v in event_dict.items()}


def configure_logging(
    level: str = "info", fmt: str = "auto", secrets: Iterable[str] = (), stream: Any = None
) -> None:
    """Configure structlog and route stdlib loggers (aiohttp, asyncpg, apscheduler) through it."""
    global _secrets
    _secrets = secret_forms(secrets)
    stream = stream or sys.stderr
    console = fmt == "console" or (fmt == "auto" and stream.isatty())
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        _redact_secrets,
    ]
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=stream.isatty())
        if console
        else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
            foreign_pre_chain=shared,
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("aiohttp.access", "apscheduler.executors.default"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
