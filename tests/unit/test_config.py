"""Configuration: every bad variable is named, secrets never appear in repr or errors."""

from __future__ import annotations

import os

import pytest

from worker.config import VARIABLE_NAMES, load_settings, pid_namespace
from worker.errors import ConfigError
from worker.leases import parse_owner

KEY = {"TWILIO_API_KEY_SID": "SK" + "1" * 32, "TWILIO_API_KEY_SECRET": "s3cret-key"}


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"DATABASE_URL": "mysql://x/y"}, "DATABASE_URL"),
        ({"DATABASE_URL": "postgresql://u:pw@host:notaport/db"}, "DATABASE_URL"),
        ({"CONVSYNC_SERVICES": "IS123"}, "CONVSYNC_SERVICES"),
        ({"CONVSYNC_PAGE_SIZE": "51"}, "CONVSYNC_PAGE_SIZE"),
        ({"CONVSYNC_PAGE_SIZE": "0"}, "CONVSYNC_PAGE_SIZE"),
        ({"CONVSYNC_CONCURRENCY": "many"}, "CONVSYNC_CONCURRENCY"),
        ({"CONVSYNC_SCHEDULE": "*/5 * * * *", "CONVSYNC_INTERVAL": "60"}, "CONVSYNC_INTERVAL"),
        ({"TWILIO_API_KEY_SID": "SK" + "1" * 32}, "TWILIO_API_KEY_SECRET"),
        ({"TWILIO_AUTH_TOKEN": "tok"}, "TWILIO_ACCOUNT_SID"),
        ({"TWILIO_ACCOUNT_SID": "AC123", "TWILIO_AUTH_TOKEN": "t"}, "TWILIO_ACCOUNT_SID"),
        ({"TWILIO_CONVERSATIONS_BASE_URL": "ftp://x"}, "TWILIO_CONVERSATIONS_BASE_URL"),
        ({"CONVSYNC_RUN_AT_START": "maybe"}, "CONVSYNC_RUN_AT_START"),
        ({"CONVSYNC_ASYNC_COMMIT": "sometimes"}, "CONVSYNC_ASYNC_COMMIT"),
        ({"DATABASE_URL": "postgresql://u@h/db?sslmode=bogus"}, "DATABASE_URL: sslmode"),
        ({"DATABASE_URL": "postgresql://h/db?target_session_attrs=x"}, "DATABASE_URL"),
        ({"DATABASE_URL": "postgresql://h1:5432,h2:x/db"}, "DATABASE_URL is not a valid URL"),
        ({"DATABASE_URL": "postgresql://h/db?connect_timeout=10"}, "connect_timeout"),
        ({"DATABASE_URL": "postgresql://h/db?keepalives=1"}, "keepalives is libpq's"),
        ({"DATABASE_URL": "postgresql://h/db?sslmode=require&gssencmode=disable"}, "gssencmode"),
        ({"TWILIO_CONVERSATIONS_BASE_URL": "https://u:pw@h"}, "must not hold credentials"),
        ({"TWILIO_CONVERSATIONS_BASE_URL": "https://h/?x=1"}, "TWILIO_CONVERSATIONS_BASE_URL"),
        ({"TWILIO_CONVERSATIONS_BASE_URL": "https://h/api?"}, "must not have a query"),
        ({"TWILIO_CONVERSATIONS_BASE_URL": "https://h/api#"}, "must not have a query"),
        ({"CONVSYNC_MAX_RESPONSE_BYTES": "10"}, "CONVSYNC_MAX_RESPONSE_BYTES"),
        ({"CONVSYNC_MAX_PAGES": "0"}, "CONVSYNC_MAX_PAGES"),
        ({"CONVSYNC_MAX_PAGE_ITEMS": "none"}, "CONVSYNC_MAX_PAGE_ITEMS"),
        ({"CONVSYNC_DB_WAIT_SECONDS": "-1"}, "CONVSYNC_DB_WAIT_SECONDS"),
        ({"CONVSYNC_HTTP_HOST": "my host"}, "CONVSYNC_HTTP_HOST"),
        ({"CONVSYNC_HTTP_HEADER_TIMEOUT": "0"}, "CONVSYNC_HTTP_HEADER_TIMEOUT"),
        # nan passes every comparison and inf, like a huge value, overflows an interval or a
        # timer later: each is refused here, named
        ({"CONVSYNC_REQUEST_TIMEOUT": "nan"}, "CONVSYNC_REQUEST_TIMEOUT must be a finite"),
        ({"CONVSYNC_WEBHOOK_COALESCE_SECONDS": "nan"}, "CONVSYNC_WEBHOOK_COALESCE_SECONDS"),
        ({"CONVSYNC_INTERVAL": "inf"}, "CONVSYNC_INTERVAL must be a finite"),
        ({"CONVSYNC_DB_WAIT_SECONDS": "inf"}, "CONVSYNC_DB_WAIT_SECONDS"),
        ({"CONVSYNC_SHUTDOWN_GRACE": "-inf"}, "CONVSYNC_SHUTDOWN_GRACE"),
        ({"CONVSYNC_LEASE_SECONDS": "1e17"}, "CONVSYNC_LEASE_SECONDS must be at most 100,000,000"),
        ({"CONVSYNC_RATE_LIMIT": "NaN"}, "CONVSYNC_RATE_LIMIT"),
        ({"CONVSYNC_CONCURRENCY": "1" + "0" * 400}, "CONVSYNC_CONCURRENCY must be between"),
    ],
)
def test_bad_values_name_their_variable(env: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        load_settings(env)


def test_api_key_is_preferred_and_secrets_stay_out_of_repr() -> None:
    env = {
        **KEY,
        "TWILIO_ACCOUNT_SID": "AC" + "2" * 32,
        "TWILIO_AUTH_TOKEN": "account-token",
        "DATABASE_URL": "postgresql://me:dbpass@localhost/db",
    }
    settings = load_settings(env)
    assert settings.credentials is not None
    assert settings.credentials.username == KEY["TWILIO_API_KEY_SID"]
    text = repr(settings)
    for secret in ("s3cret-key", "dbpass"):
        assert secret not in text
    # the auth token too (set, though the API key is used) and the Basic credentials of both
    assert {"s3cret-key", "dbpass", "account-token"} <= set(settings.secrets())
    assert settings.credentials.basic in settings.secrets()


def test_defaults() -> None:
    settings = load_settings({})
    assert (settings.concurrency, settings.page_size) == (16, 50)
    assert settings.base_url == "https://conversations.twilio.com"
    assert settings.services == ()
    assert settings.max_response_bytes == 16 * 1024 * 1024
    assert (settings.max_page_items, settings.max_pages) == (1000, 20000)
    assert (settings.http_host, settings.http_header_timeout) == ("0.0.0.0", 10.0)
    assert settings.db_wait_seconds == 60.0
    assert settings.async_commit is True
    assert load_settings({"CONVSYNC_ASYNC_COMMIT": "false"}).async_commit is False


def test_every_default_in_the_reference_is_the_one_in_force() -> None:
    from worker.config import VARIABLES

    settings = load_settings({})
    for variable in VARIABLES:
        name = variable.name.removeprefix("CONVSYNC_").lower()
        if variable.default is None or not hasattr(settings, name):
            continue
        value = getattr(settings, name)
        assert str(value).lower() in (variable.default, f"{variable.default}.0"), variable.name


def test_sid_patterns_are_exact_as_the_database_checks_them() -> None:
    from worker.config import ACCOUNT_SID, API_KEY_SID, SERVICE_SID, USER_SID

    for pattern, prefix in ((SERVICE_SID, "IS"), (USER_SID, "US"), (ACCOUNT_SID, "AC")):
        assert pattern.fullmatch(prefix + "a" * 32)
        assert not pattern.fullmatch(prefix + "a" * 32 + "\n")
    assert not API_KEY_SID.fullmatch("SK" + "1" * 32 + "\n")


def test_secrets_hidden_in_urls_are_found_even_in_an_invalid_one() -> None:
    from worker.config import secret_values

    found = secret_values(
        {
            "DATABASE_URL": "postgresql://u:p%40ss@[::1/db?password=q%26w",
            "TWILIO_CONVERSATIONS_BASE_URL": "https://sid:base-secret@h",
        }
    )
    assert {"p%40ss", "p@ss", "q%26w", "q&w", "base-secret"} <= set(found)


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://root:12?tailpart9@127.0.0.1:5432/db",  # an unencoded ? in the password
        "postgresql://root@127.0.0.1/db?password=s3cr&tailpart9",  # an unencoded &
    ],
)
def test_a_url_asyncpg_would_refuse_is_refused_without_its_secret(url: str) -> None:
    with pytest.raises(ConfigError, match="DATABASE_URL: its query is malformed") as refused:
        load_settings({"DATABASE_URL": url})
    assert "tailpart9" not in str(refused.value)


def test_a_failover_list_of_hosts_is_a_valid_database_url() -> None:
    url = "postgresql://u:pw@h1:5432,h2:5433/db?target_session_attrs=read-write"
    assert load_settings({"DATABASE_URL": url}).database_url == url


def test_every_variable_read_is_declared() -> None:
    """The configuration reference is generated from VARIABLES: nothing read may be missing."""
    import inspect

    import worker.config as config

    source = inspect.getsource(config.load_settings) + inspect.getsource(config._credentials)
    import re

    read = set(re.findall(r'"((?:CONVSYNC|TWILIO|DATABASE)_[A-Z_]+)"', source))
    assert read <= VARIABLE_NAMES


def test_default_worker_ids_are_unique_and_name_host_pid_namespace_and_pid() -> None:
    import os

    from worker.leases import parse_owner

    first, second = load_settings({}).worker_id, load_settings({}).worker_id
    assert first != second
    parsed = parse_owner(first)
    assert parsed is not None
    assert parsed[2] == os.getpid()
    assert parse_owner("my-configured-replica") is None


def test_replicas_sharing_a_configured_worker_name_hold_claims_of_their_own() -> None:
    # Set in shared configuration (a ConfigMap, an env file), the name is every replica's: a
    # process stopping gives back its own claims alone, so each owner stays its process's.
    first, second = (load_settings({"CONVSYNC_WORKER_ID": "mirror"}).worker_id for _ in "ab")
    assert first != second
    for owner in (first, second):
        assert owner.startswith("mirror:")
        assert parse_owner(owner) == ("mirror", pid_namespace(), os.getpid())
