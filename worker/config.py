"""Environment -> one validated, typed ``Settings`` object. Knows about nothing else."""

from __future__ import annotations

import base64
import dataclasses
import importlib.util
import ipaddress
import math
import os
import re
import secrets
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import SplitResult, parse_qsl, unquote_plus, urlsplit

from worker.errors import ConfigError
from worker.sids import SID_PATTERNS

# Applied with ``fullmatch`` (see worker.sids).
SERVICE_SID, USER_SID = SID_PATTERNS["IS"], SID_PATTERNS["US"]
ACCOUNT_SID, API_KEY_SID = SID_PATTERNS["AC"], SID_PATTERNS["SK"]
MAX_PAGE_SIZE = 50
# The bound of a float setting that names none (seconds, requests a second): 10^8 seconds is
# three years, past any sensible value and well within what PostgreSQL's intervals and
# asyncio's timers hold.
FLOAT_SETTING_BOUND = 100_000_000
SSL_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
SESSION_ATTRS = ("any", "primary", "standby", "prefer-standby", "read-write", "read-only")
Number = TypeVar("Number", int, float)


@dataclass(frozen=True)
class TwilioCredentials:
    """HTTP Basic credentials: an API key (preferred) or the account SID and auth token."""

    username: str
    password: str = field(repr=False)

    @property
    def basic(self) -> str:
        """The HTTP Basic credentials as sent (base64 of ``username:password``): a secret."""
        return basic_credentials(self.username, self.password)


@dataclass(frozen=True)
class Settings:
    """Everything convsync reads from the environment, validated."""

    database_url: str | None = field(repr=False)
    credentials: TwilioCredentials | None
    base_url: str = "https://conversations.twilio.com"
    services: tuple[str, ...] = ()
    concurrency: int = 16
    page_size: int = 50
    rate_limit: float | None = None
    request_timeout: float = 30.0
    max_attempts: int = 8
    max_retry_seconds: float = 120.0
    max_response_bytes: int = 16 * 1024 * 1024
    max_page_items: int = 1000
    max_pages: int = 20000
    db_pool_size: int = 8
    # Small batches commit sooner: a page's loop waits for its whole batch, and a batch of 64
    # pages held them all for its length (paired passes: bench/README.md, "Findings").
    batch_pages: int = 8
    batch_ms: float = 0.0
    async_commit: bool = True
    db_wait_seconds: float = 60.0
    lease_seconds: float = 60.0
    worker_id: str = ""
    schedule: str | None = None
    interval: float | None = None
    run_at_start: bool = True
    http_host: str = "0.0.0.0"  # noqa: S104 (probes come from outside the container)
    http_port: int = 8080
    http_header_timeout: float = 10.0
    shutdown_grace: float = 25.0
    log_format: str = "auto"
    log_level: str = "info"
    event_loop: str = "auto"
    webhooks: bool = False
    # The key Twilio signs webhooks with: CONVSYNC_WEBHOOK_AUTH_TOKEN, else TWILIO_AUTH_TOKEN.
    webhook_auth_token: str | None = field(default=None, repr=False)
    webhook_url: str | None = None
    webhook_coalesce_seconds: float = 2.0
    relist_concurrency: int = 4
    # Every secret the environment held, used or not (e.g. TWILIO_AUTH_TOKEN beside an API key).
    environment_secrets: tuple[str, ...] = field(default=(), repr=False)

    def require_database(self) -> str:
        """The database URL, or a ConfigError naming the variable."""
        if not self.database_url:
            raise ConfigError("DATABASE_URL is not set")
        return self.database_url

    def require_credentials(self) -> TwilioCredentials:
        """The Twilio credentials, or a ConfigError naming the variables."""
        if self.credentials is None:
            raise ConfigError(
                "Twilio credentials are not set: set TWILIO_API_KEY_SID and "
                "TWILIO_API_KEY_SECRET, or TWILIO_ACCOUNT_SID and TWILIO_AUTH_TOKEN"
            )
        return self.credentials

    def require_webhook_key(self) -> str:
        """The webhook signing key, or a ConfigError naming the variables."""
        if not self.webhook_auth_token:
            raise ConfigError(
                "CONVSYNC_WEBHOOKS is true but no key checks their signatures: set "
                "CONVSYNC_WEBHOOK_AUTH_TOKEN (or TWILIO_AUTH_TOKEN) to the account's auth token"
            )
        return self.webhook_auth_token

    def secrets(self) -> tuple[str, ...]:
        """Every secret value known, for redaction (``worker.logs`` adds their encodings)."""
        found = list(self.environment_secrets)
        if self.credentials is not None:
            found += [self.credentials.password, self.credentials.basic]
        found += url_secrets(self.database_url)
        return tuple(dict.fromkeys(s for s in found if s))


@dataclass(frozen=True)
class Variable:
    """One environment variable: its name, meaning and the ``Settings`` field it sets (whose
    default is the variable's: defaults are stated once, in ``Settings``)."""

    name: str
    help: str
    secret: bool = False
    setting: str | None = None

    @property
    def default(self) -> str | None:
        """The default as an operator writes it (None: unset by default)."""
        if self.setting is None:
            return None
        value = _SETTINGS_DEFAULTS[self.setting]
        if value is None or value == ():
            return None
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, float):
            return f"{value:g}"
        return str(value)


_SETTINGS_DEFAULTS: dict[str, Any] = {
    f.name: f.default for f in dataclasses.fields(Settings) if f.default is not dataclasses.MISSING
}
VARIABLES: tuple[Variable, ...] = (
    Variable(
        "DATABASE_URL",
        "PostgreSQL URL (postgresql://user:pass@host:port/db; failover hosts as"
        " host1:port,host2:port; ?, & and # in the password percent-encoded). Its query takes"
        " asyncpg's parameters (sslmode, target_session_attrs...) and server settings"
        " (application_name=...); libpq's alone (connect_timeout, keepalives...) are refused.",
        secret=True,
    ),
    Variable("TWILIO_API_KEY_SID", "API key SID (SK...); preferred over the auth token."),
    Variable("TWILIO_API_KEY_SECRET", "API key secret.", secret=True),
    Variable("TWILIO_ACCOUNT_SID", "Account SID (AC...), with TWILIO_AUTH_TOKEN."),
    Variable("TWILIO_AUTH_TOKEN", "Account auth token.", secret=True),
    Variable(
        "TWILIO_CONVERSATIONS_BASE_URL",
        "Base URL of the Conversations API (the simulator's URL for local runs); a path"
        " prefix (a proxy's) is kept.",
        setting="base_url",
    ),
    Variable("CONVSYNC_SERVICES", "Comma-separated IS SIDs; unset: discover all services."),
    Variable(
        "CONVSYNC_CONCURRENCY",
        "Upper bound of requests in flight (adaptive below).",
        setting="concurrency",
    ),
    Variable("CONVSYNC_PAGE_SIZE", "Items per page, 1..50.", setting="page_size"),
    Variable("CONVSYNC_RATE_LIMIT", "Optional hard ceiling in requests per second."),
    Variable(
        "CONVSYNC_REQUEST_TIMEOUT",
        "Seconds before one request is abandoned.",
        setting="request_timeout",
    ),
    Variable(
        "CONVSYNC_MAX_ATTEMPTS",
        "Attempts per request before the user fails.",
        setting="max_attempts",
    ),
    Variable(
        "CONVSYNC_MAX_RETRY_SECONDS",
        "Total seconds one request may spend retrying.",
        setting="max_retry_seconds",
    ),
    Variable(
        "CONVSYNC_MAX_RESPONSE_BYTES",
        "Largest response body accepted, counted after decompression (16 MiB); a larger one "
        "fails its listing at once, unretried.",
        setting="max_response_bytes",
    ),
    Variable(
        "CONVSYNC_MAX_PAGE_ITEMS",
        "Most items a page may hold (never more than the PageSize asked for).",
        setting="max_page_items",
    ),
    Variable(
        "CONVSYNC_MAX_PAGES",
        "Most pages one listing (a service's users, a user's conversations) may span.",
        setting="max_pages",
    ),
    Variable(
        "CONVSYNC_DB_POOL_SIZE",
        "PostgreSQL connections held by the worker (from 5, each group-commit writer keeps "
        "one between its batches).",
        setting="db_pool_size",
    ),
    Variable(
        "CONVSYNC_BATCH_PAGES",
        "Most pages one transaction writes (group commit).",
        setting="batch_pages",
    ),
    Variable(
        "CONVSYNC_BATCH_MS",
        "Milliseconds a batch may wait for more pages before it commits.",
        setting="batch_ms",
    ),
    Variable(
        "CONVSYNC_ASYNC_COMMIT",
        "Page batches commit without waiting for their WAL flush (synchronous_commit off for "
        "them alone): a PostgreSQL crash may lose the last batches, pages and cursors together, "
        "and those pages are fetched again. false: each batch waits for its flush.",
        setting="async_commit",
    ),
    Variable(
        "CONVSYNC_DB_WAIT_SECONDS",
        "Seconds a pass waits for a database that is down, read-only or in recovery.",
        setting="db_wait_seconds",
    ),
    Variable(
        "CONVSYNC_LEASE_SECONDS",
        "How long a claimed user stays claimed unrenewed.",
        setting="lease_seconds",
    ),
    Variable(
        "CONVSYNC_WORKER_ID",
        "This replica's name in claims (default: the host's); its pid namespace, pid and a"
        " random tag always follow it, so that replicas sharing a name never share claims.",
    ),
    Variable("CONVSYNC_SCHEDULE", "`convsync run`: cron expression (UTC) for passes."),
    Variable(
        "CONVSYNC_INTERVAL",
        "`convsync run`: seconds between passes (3600 when no schedule is set).",
    ),
    Variable(
        "CONVSYNC_RUN_AT_START", "`convsync run`: start a pass immediately.", setting="run_at_start"
    ),
    Variable(
        "CONVSYNC_HTTP_HOST",
        "`convsync run`: address of /healthz, /readyz, /metrics (0.0.0.0: every IPv4 "
        "interface; `::`: every IPv6 one, IPv6 only).",
        setting="http_host",
    ),
    Variable(
        "CONVSYNC_HTTP_PORT",
        "`convsync run`: port of /healthz, /readyz, /metrics (0: a free one, named in the "
        "`service_started` log line).",
        setting="http_port",
    ),
    Variable(
        "CONVSYNC_HTTP_HEADER_TIMEOUT",
        "`convsync run`: seconds a client has to send a request's headers (and idles at most).",
        setting="http_header_timeout",
    ),
    Variable(
        "CONVSYNC_WEBHOOKS",
        "`convsync run`: accept Twilio post-event webhooks at POST /webhooks/twilio and re-list "
        "the users they name between passes.",
        setting="webhooks",
    ),
    Variable(
        "CONVSYNC_WEBHOOK_AUTH_TOKEN",
        "The account auth token Twilio signs webhooks with (default: TWILIO_AUTH_TOKEN).",
        secret=True,
    ),
    Variable(
        "CONVSYNC_WEBHOOK_URL",
        "The public URL Twilio calls (behind a proxy or ingress), as signed; default: the URL "
        "as received.",
    ),
    Variable(
        "CONVSYNC_WEBHOOK_COALESCE_SECONDS",
        "Seconds a user's webhooks are gathered before one re-list serves them all.",
        setting="webhook_coalesce_seconds",
    ),
    Variable(
        "CONVSYNC_RELIST_CONCURRENCY",
        "Users re-listed at once for webhooks (their requests count in CONVSYNC_CONCURRENCY).",
        setting="relist_concurrency",
    ),
    Variable(
        "CONVSYNC_SHUTDOWN_GRACE",
        "Seconds in-flight work gets after SIGTERM.",
        setting="shutdown_grace",
    ),
    Variable(
        "CONVSYNC_EVENT_LOOP",
        "auto (uvloop where installed), uvloop or asyncio.",
        setting="event_loop",
    ),
    Variable(
        "CONVSYNC_LOG_FORMAT",
        "auto (console on a TTY, else JSON), json or console.",
        setting="log_format",
    ),
    Variable("CONVSYNC_LOG_LEVEL", "debug, info, warning or error.", setting="log_level"),
    Variable(
        "CONVSYNC_MIGRATIONS_DIR",
        "Folder of the migration files (default: those shipped in the package).",
    ),
)
VARIABLE_NAMES = frozenset(v.name for v in VARIABLES)


def basic_credentials(username: str, password: str) -> str:
    return base64.b64encode(f"{username}:{password}".encode()).decode("ascii")


def url_secrets(url: str | None) -> list[str]:
    """The password of a URL, as written and decoded, from its user info and from a
    ``password`` query parameter; read leniently, so that an invalid URL still gives it up."""
    if not url:
        return []
    rest = url.split("://", 1)[-1]
    userinfo = re.split(r"[/?#]", rest, maxsplit=1)[0].rpartition("@")[0]
    found = [userinfo.partition(":")[2]] if ":" in userinfo else []
    for pair in rest.partition("?")[2].partition("#")[0].split("&"):
        key, _, value = pair.partition("=")
        if unquote_plus(key).lower() in ("password", "sslpassword"):
            found.append(value)
    return [form for s in found for form in (s, unquote_plus(s)) if form]


def secret_values(env: Mapping[str, str]) -> tuple[str, ...]:
    """Every secret in ``env``, valid or not, for redaction: the secret variables, the
    passwords inside URLs, and the Basic credentials either Twilio pair would send."""
    found = [
        value
        for v in VARIABLES
        if v.secret and v.name != "DATABASE_URL" and (value := _get(env, v.name))
    ]
    for user_name, secret_name in (
        ("TWILIO_API_KEY_SID", "TWILIO_API_KEY_SECRET"),
        ("TWILIO_ACCOUNT_SID", "TWILIO_AUTH_TOKEN"),
    ):
        user, secret = _get(env, user_name), _get(env, secret_name)
        if user and secret:
            found.append(basic_credentials(user, secret))
    found += url_secrets(_get(env, "DATABASE_URL"))
    found += url_secrets(_get(env, "TWILIO_CONVERSATIONS_BASE_URL"))
    return tuple(dict.fromkeys(found))


def _get(env: Mapping[str, str], name: str) -> str | None:
    value = env.get(name)
    if value is None or value.strip() == "":
        return None
    return value.strip()


def _number(
    env: Mapping[str, str],
    name: str,
    cast: Callable[[str], Number],
    low: Number,
    high: Number | None = None,
) -> Number | None:
    raw = _get(env, name)
    if raw is None:
        return None
    try:
        value = cast(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from None
    if cast is float and not math.isfinite(value):  # nan passes every comparison; inf overflows
        raise ConfigError(f"{name} must be a finite number, got {raw!r}")
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise ConfigError(f"{name} must be {bound}, got {raw}")
    if high is None and cast is float and value > FLOAT_SETTING_BOUND:
        raise ConfigError(f"{name} must be at most {FLOAT_SETTING_BOUND:,}, got {raw}")
    return value


def _bool(env: Mapping[str, str], name: str) -> bool | None:
    raw = _get(env, name)
    if raw is None:
        return None
    if raw.lower() in ("1", "true", "yes", "on"):
        return True
    if raw.lower() in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name} must be true or false, got {raw!r}")


# libpq's connection parameters that asyncpg does not read: it would send each to the server as
# a setting, and PostgreSQL refuses a connection naming a setting it has not (a replication
# connection, for ``replication``, runs no SQL). Refused here, named, rather than there.
LIBPQ_ONLY_PARAMETERS = frozenset(
    {
        "channel_binding",
        "connect_timeout",
        "fallback_application_name",
        "gssdelegation",
        "gssencmode",
        "hostaddr",
        "keepalives",
        "keepalives_count",
        "keepalives_idle",
        "keepalives_interval",
        "load_balance_hosts",
        "replication",
        "require_auth",
        "requirepeer",
        "sslcertmode",
        "sslcompression",
        "sslkeylogfile",
        "sslsni",
    }
)


def validate_database_url(url: str, name: str = "DATABASE_URL") -> str:
    """Reject URLs asyncpg cannot use, without echoing the password."""
    try:
        parts = urlsplit(url)
        for host in parts.netloc.rpartition("@")[2].split(","):  # a failover list: h1,h2:5433
            _ = urlsplit(f"//{host}").port
    except ValueError:
        raise ConfigError(f"{name} is not a valid URL") from None
    if parts.scheme not in ("postgres", "postgresql"):
        raise ConfigError(f"{name} must start with postgresql://")
    try:  # every field key=value, as asyncpg requires (its error would quote the rest)
        fields = parse_qsl(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
    except ValueError:
        raise ConfigError(
            f"{name}: its query is malformed (a password holding ?, & or # must be percent-encoded)"
        ) from None
    for key, value in fields:
        if key == "connect_timeout":
            raise ConfigError(f"{name}: connect_timeout is not supported (asyncpg's is 10 s)")
        if key in LIBPQ_ONLY_PARAMETERS:
            raise ConfigError(f"{name}: {key} is libpq's, not supported by asyncpg")
        allowed = {"sslmode": SSL_MODES, "target_session_attrs": SESSION_ATTRS}.get(key)
        if allowed is not None and value not in allowed:
            raise ConfigError(f"{name}: {key} must be one of {', '.join(allowed)}")
    return url


def _http_url(url: str, name: str) -> SplitResult:
    """``url`` split, when it is an http(s) URL with a host (else a ConfigError naming it)."""
    try:
        parts = urlsplit(url)
        _ = parts.port
    except ValueError:
        raise ConfigError(f"{name} is not a valid URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{name} must be an http(s) URL")
    return parts


def validate_base_url(url: str, name: str = "TWILIO_CONVERSATIONS_BASE_URL") -> str:
    """An http(s) origin (and optional path prefix), without credentials, query or fragment."""
    parts = _http_url(url, name)
    if "@" in parts.netloc:
        raise ConfigError(
            f"{name} must not hold credentials: set TWILIO_API_KEY_SID and TWILIO_API_KEY_SECRET"
        )
    if parts.query or parts.fragment or "?" in url or "#" in url:  # even an empty one
        raise ConfigError(f"{name} must not have a query or a fragment")
    return url


def validate_webhook_url(url: str, name: str = "CONVSYNC_WEBHOOK_URL") -> str:
    """The full http(s) URL Twilio calls (a query is part of what it signs; no fragment)."""
    if _http_url(url, name).fragment:
        raise ConfigError(f"{name} must be an http(s) URL without a fragment")
    return url


def _host(env: Mapping[str, str], name: str) -> str | None:
    raw = _get(env, name)
    if raw is None:
        return None
    try:
        ipaddress.ip_address(raw)
    except ValueError:
        if not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?", raw):
            raise ConfigError(f"{name} must be an IP address or a host name, got {raw!r}") from None
    return raw


def _credentials(env: Mapping[str, str]) -> TwilioCredentials | None:
    key_sid, key_secret = _get(env, "TWILIO_API_KEY_SID"), _get(env, "TWILIO_API_KEY_SECRET")
    account, token = _get(env, "TWILIO_ACCOUNT_SID"), _get(env, "TWILIO_AUTH_TOKEN")
    if key_sid or key_secret:
        if not (key_sid and key_secret):
            missing = "TWILIO_API_KEY_SECRET" if key_sid else "TWILIO_API_KEY_SID"
            raise ConfigError(f"{missing} is not set (the API key needs both parts)")
        if not API_KEY_SID.fullmatch(key_sid):
            raise ConfigError("TWILIO_API_KEY_SID must look like SK followed by 32 hex digits")
        return TwilioCredentials(key_sid, key_secret)
    if account or token:
        if not (account and token):
            missing = "TWILIO_AUTH_TOKEN" if account else "TWILIO_ACCOUNT_SID"
            raise ConfigError(f"{missing} is not set (account credentials need both parts)")
        if not ACCOUNT_SID.fullmatch(account):
            raise ConfigError("TWILIO_ACCOUNT_SID must look like AC followed by 32 hex digits")
        return TwilioCredentials(account, token)
    return None


def parse_sids(raw: str | None, pattern: re.Pattern[str], name: str) -> tuple[str, ...]:
    """Split a comma-separated SID list, rejecting any malformed SID by name."""
    if raw is None:
        return ()
    sids = tuple(s.strip() for s in raw.split(",") if s.strip())
    for sid in sids:
        if not pattern.fullmatch(sid):
            raise ConfigError(f"{name} has an invalid SID {sid!r}")
    return sids


def pid_namespace() -> str:
    """This process's pid namespace (Linux), so pids are only compared within one."""
    try:
        return os.readlink("/proc/self/ns/pid").strip("pid:[]")
    except OSError:
        return "0"


def unique_worker_id(name: str | None = None) -> str:
    """name:pidns:pid:nonce (the name: the host's by default), unique per process even when a
    container restarts as pid 1, or when replicas share a configured name: claims are a
    process's own, and a process stopping gives back its own alone."""
    return f"{name or socket.gethostname()}:{pid_namespace()}:{os.getpid()}:{secrets.token_hex(3)}"


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Read and validate the environment; raise ConfigError naming the first bad variable."""
    env = os.environ if env is None else env
    database_url = _get(env, "DATABASE_URL")
    if database_url is not None:
        validate_database_url(database_url)
    base_url = validate_base_url(
        (_get(env, "TWILIO_CONVERSATIONS_BASE_URL") or Settings.base_url).rstrip("/")
    )
    schedule, interval = (
        _get(env, "CONVSYNC_SCHEDULE"),
        _number(env, "CONVSYNC_INTERVAL", float, 1.0),
    )
    if schedule is not None and interval is not None:
        raise ConfigError("CONVSYNC_SCHEDULE and CONVSYNC_INTERVAL are both set; choose one")
    log_format = (_get(env, "CONVSYNC_LOG_FORMAT") or Settings.log_format).lower()
    if log_format not in ("auto", "json", "console"):
        raise ConfigError("CONVSYNC_LOG_FORMAT must be auto, json or console")
    event_loop = (_get(env, "CONVSYNC_EVENT_LOOP") or Settings.event_loop).lower()
    if event_loop not in ("auto", "uvloop", "asyncio"):
        raise ConfigError("CONVSYNC_EVENT_LOOP must be auto, uvloop or asyncio")
    if event_loop == "uvloop" and importlib.util.find_spec("uvloop") is None:
        raise ConfigError("CONVSYNC_EVENT_LOOP is uvloop, but uvloop is not installed")
    log_level = (_get(env, "CONVSYNC_LOG_LEVEL") or Settings.log_level).lower()
    if log_level not in ("debug", "info", "warning", "error"):
        raise ConfigError("CONVSYNC_LOG_LEVEL must be debug, info, warning or error")
    values: dict[str, Any] = {
        "concurrency": _number(env, "CONVSYNC_CONCURRENCY", int, 1, 1024),
        "page_size": _number(env, "CONVSYNC_PAGE_SIZE", int, 1, MAX_PAGE_SIZE),
        "rate_limit": _number(env, "CONVSYNC_RATE_LIMIT", float, 0.1),
        "request_timeout": _number(env, "CONVSYNC_REQUEST_TIMEOUT", float, 0.1),
        "max_attempts": _number(env, "CONVSYNC_MAX_ATTEMPTS", int, 1, 100),
        "max_retry_seconds": _number(env, "CONVSYNC_MAX_RETRY_SECONDS", float, 0.0),
        "max_response_bytes": _number(env, "CONVSYNC_MAX_RESPONSE_BYTES", int, 1024),
        "max_page_items": _number(env, "CONVSYNC_MAX_PAGE_ITEMS", int, 1),
        "max_pages": _number(env, "CONVSYNC_MAX_PAGES", int, 1),
        "db_pool_size": _number(env, "CONVSYNC_DB_POOL_SIZE", int, 2, 100),
        "batch_pages": _number(env, "CONVSYNC_BATCH_PAGES", int, 1, 1000),
        "batch_ms": _number(env, "CONVSYNC_BATCH_MS", float, 0.0, 10_000.0),
        "async_commit": _bool(env, "CONVSYNC_ASYNC_COMMIT"),
        "db_wait_seconds": _number(env, "CONVSYNC_DB_WAIT_SECONDS", float, 0.0),
        "lease_seconds": _number(env, "CONVSYNC_LEASE_SECONDS", float, 1.0),
        "http_host": _host(env, "CONVSYNC_HTTP_HOST"),
        "http_port": _number(env, "CONVSYNC_HTTP_PORT", int, 0, 65535),
        "http_header_timeout": _number(env, "CONVSYNC_HTTP_HEADER_TIMEOUT", float, 0.1),
        "shutdown_grace": _number(env, "CONVSYNC_SHUTDOWN_GRACE", float, 0.0),
        "run_at_start": _bool(env, "CONVSYNC_RUN_AT_START"),
        "webhooks": _bool(env, "CONVSYNC_WEBHOOKS"),
        "webhook_coalesce_seconds": _number(
            env, "CONVSYNC_WEBHOOK_COALESCE_SECONDS", float, 0.0, 3600.0
        ),
        "relist_concurrency": _number(env, "CONVSYNC_RELIST_CONCURRENCY", int, 1, 1024),
    }
    webhook_url = _get(env, "CONVSYNC_WEBHOOK_URL")
    if webhook_url is not None:
        validate_webhook_url(webhook_url)
    return Settings(
        database_url=database_url,
        credentials=_credentials(env),
        base_url=base_url,
        services=parse_sids(_get(env, "CONVSYNC_SERVICES"), SERVICE_SID, "CONVSYNC_SERVICES"),
        schedule=schedule,
        interval=interval,
        worker_id=unique_worker_id(_get(env, "CONVSYNC_WORKER_ID")),
        log_format=log_format,
        log_level=log_level,
        event_loop=event_loop,
        webhook_auth_token=(
            _get(env, "CONVSYNC_WEBHOOK_AUTH_TOKEN") or _get(env, "TWILIO_AUTH_TOKEN")
        ),
        webhook_url=webhook_url,
        environment_secrets=secret_values(env),
        **{k: v for k, v in values.items() if v is not None},
    )


def reference_table() -> str:
    """The configuration reference as a Markdown table (README.md embeds it verbatim)."""
    lines = ["| variable | default | meaning |", "|---|---|---|"]
    for v in VARIABLES:
        default = f"`{v.default}`" if v.default is not None else ""
        secret = " Secret: never logged." if v.secret else ""
        lines.append(f"| `{v.name}` | {default} | {v.help}{secret} |")
    return "\n".join(lines)
