"""Bad configuration through the real CLI: exit 2 naming the variable, before any request to
Twilio, without a traceback. (tests/unit/test_config.py checks the parser itself and
tests/integration/test_cli.py a few of these; what is here is the rest, end to end.)"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from convsync_tools.simdata import Dataset
from convsync_tools.simulator import Simulator, SimulatorServer
from tests.faults.common import record
from tests.harness import convsync, failure, fetch, scalar, worker_env

DROP = None  # remove the variable


@pytest.fixture
def server() -> Iterator[SimulatorServer]:
    with SimulatorServer(Simulator(Dataset.generate(seed=61, users_per_service=5))) as s:
        yield s


def no_traceback(stderr: str) -> bool:
    return not any(line.startswith("Traceback") for line in stderr.splitlines())


CASES: list[tuple[list[str], dict[str, str | None], str]] = [
    (["sync"], {"DATABASE_URL": "not a url at all"}, "DATABASE_URL must start with postgresql://"),
    (["sync"], {"DATABASE_URL": "postgresql://u:pw@[::1/db"}, "DATABASE_URL is not a valid URL"),
    (["sync"], {"DATABASE_URL": DROP}, "DATABASE_URL is not set"),
    (["status"], {"DATABASE_URL": "mysql://u@h/db"}, "DATABASE_URL must start with postgresql://"),
    (["migrate"], {"DATABASE_URL": DROP}, "DATABASE_URL is not set"),
    (["sync"], {"CONVSYNC_SERVICES": "IS" + "0" * 31 + "g"}, "CONVSYNC_SERVICES"),
    (["sync", "--service", "IS-nope"], {}, "--service has an invalid SID"),
    (["sync", "--user", "US123"], {}, "--user has an invalid SID"),
    (["sync"], {"CONVSYNC_PAGE_SIZE": "0"}, "CONVSYNC_PAGE_SIZE must be between 1 and 50"),
    (["sync"], {"CONVSYNC_PAGE_SIZE": "ten"}, "CONVSYNC_PAGE_SIZE must be a number"),
    (["sync"], {"CONVSYNC_CONCURRENCY": "0"}, "CONVSYNC_CONCURRENCY"),
    (["sync"], {"TWILIO_ACCOUNT_SID": DROP, "TWILIO_AUTH_TOKEN": DROP}, "TWILIO_API_KEY_SID"),
    (["sync"], {"TWILIO_API_KEY_SID": "SK" + "1" * 32}, "TWILIO_API_KEY_SECRET is not set"),
    (["sync"], {"TWILIO_ACCOUNT_SID": "AC-short"}, "TWILIO_ACCOUNT_SID must look like AC"),
    (["sync"], {"CONVSYNC_LOG_LEVEL": "verbose"}, "CONVSYNC_LOG_LEVEL"),
    (["sync"], {"TWILIO_CONVERSATIONS_BASE_URL": "ftp://x"}, "TWILIO_CONVERSATIONS_BASE_URL"),
    (
        ["run"],
        {"CONVSYNC_SCHEDULE": "*/5 * * * *", "CONVSYNC_INTERVAL": "60"},
        "CONVSYNC_SCHEDULE and CONVSYNC_INTERVAL are both set",
    ),
    (["run"], {"CONVSYNC_SCHEDULE": "every tuesday"}, "CONVSYNC_SCHEDULE is not a cron"),
    (["run"], {"CONVSYNC_HTTP_PORT": "70000"}, "CONVSYNC_HTTP_PORT must be between 0 and 65535"),
    (["run"], {"CONVSYNC_INTERVAL": "0.5"}, "CONVSYNC_INTERVAL must be at least 1"),
    (
        ["sync"],
        {"DATABASE_URL": "postgresql://u:pw@127.0.0.1/x?sslmode=bogus"},
        "DATABASE_URL: sslmode must be one of",
    ),
    (
        ["sync"],
        {"TWILIO_CONVERSATIONS_BASE_URL": "http://AC1:base-url-secret@127.0.0.1:9"},
        "TWILIO_CONVERSATIONS_BASE_URL must not hold credentials",
    ),
    (["run"], {"CONVSYNC_HTTP_HOST": "not a host"}, "CONVSYNC_HTTP_HOST must be an IP address"),
    (["sync"], {"CONVSYNC_MAX_RESPONSE_BYTES": "1k"}, "CONVSYNC_MAX_RESPONSE_BYTES must be"),
]


@pytest.mark.parametrize(
    ("args", "override", "message"), CASES, ids=[f"{a[0]}-{m.split()[0]}" for a, _, m in CASES]
)
def test_bad_configuration_exits_2_naming_it_before_any_request(
    server: SimulatorServer,
    db_url: str,
    args: list[str],
    override: dict[str, str | None],
    message: str,
) -> None:
    env: dict[str, str] = worker_env(server, db_url, CONVSYNC_HTTP_PORT="0")
    for name, value in override.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    result = convsync(args, env, timeout=30)
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert message in result.stderr, result.stderr[-2000:]
    assert no_traceback(result.stderr)
    assert failure(result.stderr)["exit_code"] == 2, "one structured line"
    assert "base-url-secret" not in result.stdout + result.stderr
    assert server.sim.stats().requests == 0, "nothing is sent on a bad configuration"
    record(config_cases=1)


def test_a_database_that_does_not_exist_is_refused_exit_2(
    server: SimulatorServer, db_url: str
) -> None:
    missing = db_url.rsplit("/", 1)[0] + "/convsync_test_no_such_database"
    result = convsync(["sync"], worker_env(server, missing), timeout=30)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "DATABASE_URL was refused" in result.stderr
    assert no_traceback(result.stderr)
    assert server.sim.stats().requests == 0
    record(config_cases=1)


def test_an_unreachable_database_is_transient_exit_1_before_any_request(
    server: SimulatorServer, db_url: str
) -> None:
    closed = "postgresql://nobody:pw@127.0.0.1:9/convsync"  # the discard port: refused
    result = convsync(["sync"], worker_env(server, closed), timeout=30)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "cannot reach the database in DATABASE_URL" in result.stderr
    assert no_traceback(result.stderr)
    assert server.sim.stats().requests == 0
    record(config_cases=1)


def test_an_unmigrated_database_is_a_clear_error_before_any_request(
    server: SimulatorServer, empty_db_url: str
) -> None:
    result = convsync(["sync"], worker_env(server, empty_db_url), timeout=30)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "run convsync migrate" in result.stderr
    assert server.sim.stats().requests == 0
    record(config_cases=1)


async def test_a_value_the_database_refuses_in_the_services_listing_is_one_line_exit_1(
    server: SimulatorServer, db_url: str
) -> None:
    """A CHECK violation nothing expected (a constraint the model does not know): the pass
    ends, recorded as failed with the reason; one structured line, no traceback, exit 1."""
    await scalar(
        db_url, "ALTER TABLE services ADD CONSTRAINT fault_no_names CHECK (friendly_name IS NULL)"
    )
    result = convsync(["sync"], worker_env(server, db_url), timeout=30)
    assert result.returncode == 1, result.stderr[-2000:]
    assert no_traceback(result.stderr)
    assert "Traceback" not in result.stdout + result.stderr
    failed = failure(result.stderr)
    assert "fault_no_names" in failed["error"]
    assert failed["error_kind"] == "CheckViolationError"
    runs = await fetch(db_url, "SELECT status, error FROM sync_runs")
    assert runs[0]["status"] == "failed"
    assert "fault_no_names" in runs[0]["error"]
    record(config_cases=1)
