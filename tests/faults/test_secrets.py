"""Secrets never reach the output: every command, succeeding and failing, at debug level and
in both log formats, with a recognisable auth token, API key secret and database password;
every line of stdout and stderr is scanned for each (and for the forms derived from them)."""

from __future__ import annotations

import asyncio
import base64
import secrets
import signal
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from urllib.parse import quote, urlsplit, urlunsplit

import asyncpg
import pytest

from convsync_tools.pgembed import quote_ident
from convsync_tools.simdata import Dataset
from convsync_tools.simulator import Simulator, SimulatorConfig, SimulatorServer
from tests.conftest import PgServer, drop_database
from tests.faults.common import record
from tests.harness import convsync, scalar, spawn_convsync, until, worker_env

TAG = secrets.token_hex(4)
AUTH_TOKEN = f"tok-SECRET-{TAG}-auth"
KEY_SID = "SK" + "7" * 32
KEY_SECRET = f"key-SECRET-{TAG}-apikey"
WRONG_TOKEN = f"wrong-SECRET-{TAG}-token"
DB_PASSWORD = f"pg:SECRET/{TAG}%pw"  # URL-special characters: the URL holds it %-encoded
OTHER_DB_PASSWORD = f"other-SECRET-{TAG}-pw"


@dataclass
class Scan:
    """Every output of every command, and what was found in it."""

    secrets: list[str]
    lines: int = 0
    commands: list[str] = field(default_factory=list)
    leaks: list[str] = field(default_factory=list)

    def check(self, name: str, stdout: str, stderr: str) -> None:
        self.commands.append(name)
        for stream, text in (("stdout", stdout), ("stderr", stderr)):
            for number, line in enumerate(text.splitlines(), 1):
                self.lines += 1
                for secret in self.secrets:
                    if secret in line:
                        self.leaks.append(f"{name} {stream}:{number}: {line[:300]}")


@pytest.fixture
def server() -> Iterator[SimulatorServer]:
    data = Dataset.generate(seed=71, services=1, users_per_service=12)
    config = SimulatorConfig(
        account_sid=data.account_sid,
        auth_token=AUTH_TOKEN,
        api_key_sid=KEY_SID,
        api_key_secret=KEY_SECRET,
    )
    with SimulatorServer(Simulator(data, config)) as s:
        yield s


@pytest.fixture
async def secret_db(pg_server: PgServer) -> AsyncIterator[str]:
    """A database owned by a role with a password; its URL (password %-encoded)."""
    role, name = f"convsync_secret_{TAG}", f"convsync_test_secret_{TAG}"
    admin = await asyncpg.connect(pg_server.url)
    try:
        escaped = DB_PASSWORD.replace("'", "''")
        await admin.execute(f"CREATE ROLE {quote_ident(role)} LOGIN PASSWORD '{escaped}'")
        await admin.execute(f"CREATE DATABASE {quote_ident(name)} OWNER {quote_ident(role)}")
    finally:
        await admin.close()
    parts = urlsplit(pg_server.url)
    host = parts.hostname or "127.0.0.1"
    netloc = f"{role}:{quote(DB_PASSWORD, safe='')}@{host}" + (
        f":{parts.port}" if parts.port else ""
    )
    try:
        yield urlunsplit(parts._replace(netloc=netloc, path=f"/{name}"))
    finally:
        await drop_database(pg_server.url, name)
        admin = await asyncpg.connect(pg_server.url)
        try:
            await admin.execute(f"DROP ROLE IF EXISTS {quote_ident(role)}")
        finally:
            await admin.close()


def with_password(url: str, password: str) -> str:
    parts = urlsplit(url)
    user = parts.username or ""
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{user}:{quote(password, safe='')}@{host}"))


def every_form(*values: str) -> list[str]:
    """A secret as given, %-encoded (as in a URL) and inside Basic credentials."""
    forms: list[str] = []
    for value in values:
        forms += [value, quote(value, safe="")]
    return sorted(set(forms))


async def test_no_command_ever_prints_a_secret(
    server: SimulatorServer, secret_db: str, pg_server: PgServer
) -> None:
    account = server.sim.config.account_sid
    basic = [
        base64.b64encode(f"{user}:{secret}".encode()).decode()
        for user, secret in ((account, AUTH_TOKEN), (KEY_SID, KEY_SECRET), (account, WRONG_TOKEN))
    ]
    scan = Scan(
        every_form(AUTH_TOKEN, KEY_SECRET, WRONG_TOKEN, DB_PASSWORD, OTHER_DB_PASSWORD) + basic
    )
    debug = {"CONVSYNC_LOG_LEVEL": "debug"}
    token_env = worker_env(server, secret_db, **debug)
    key_env = {
        **{k: v for k, v in token_env.items() if not k.startswith("TWILIO_A")},
        "TWILIO_API_KEY_SID": KEY_SID,
        "TWILIO_API_KEY_SECRET": KEY_SECRET,
        "CONVSYNC_LOG_FORMAT": "console",
    }
    data = server.sim.dataset
    victim = data.user_sids(data.service_sids()[0])[2]
    host = urlsplit(secret_db).netloc.rsplit("@", 1)[1]
    role = urlsplit(secret_db).username
    refused_db = secret_db.rsplit("/", 1)[0] + "/convsync_test_no_such_db"

    def run(name: str, args: list[str], env: dict[str, str], code: int | None) -> None:
        result = convsync(args, env, timeout=60)
        scan.check(name, result.stdout, result.stderr)
        if code is not None:
            assert result.returncode == code, (name, result.returncode, result.stderr[-1500:])

    run("migrate", ["migrate"], token_env, 0)
    run("sync ok (token, json, debug)", ["sync"], token_env, 0)
    run("sync ok (api key, console, debug)", ["sync"], key_env, 0)
    run("status", ["status"], token_env, 0)
    run("sync wrong token", ["sync"], {**token_env, "TWILIO_AUTH_TOKEN": WRONG_TOKEN}, 2)
    run("sync wrong key", ["sync"], {**key_env, "TWILIO_API_KEY_SECRET": WRONG_TOKEN}, 2)
    server.sim.fail_next(f"Users/{victim}/Conversations", 500, count=50)
    run("sync failing user", ["sync"], {**token_env, "CONVSYNC_MAX_ATTEMPTS": "2"}, 1)
    server.sim.clear_faults()
    run("status --json", ["status", "--json"], token_env, 0)
    run(
        "sync db down",
        ["sync"],
        {
            **token_env,
            "DATABASE_URL": f"postgresql://{role}:{quote(DB_PASSWORD, safe='')}@127.0.0.1:9/x",
        },
        1,
    )
    run(
        "sync other db password",
        ["sync"],
        {**token_env, "DATABASE_URL": with_password(secret_db, OTHER_DB_PASSWORD)},
        None,  # refused where passwords are checked, accepted under trust auth
    )
    run("sync no such db", ["sync"], {**token_env, "DATABASE_URL": refused_db}, 2)
    run(
        "sync db url bad port",
        ["sync"],
        {
            **token_env,
            "DATABASE_URL": f"postgresql://{role}:{quote(DB_PASSWORD, safe='')}@{host}:port/x",
        },
        2,
    )
    run(
        "sync db url bad scheme",
        ["sync"],
        {**token_env, "DATABASE_URL": f"mysql://{role}:{quote(DB_PASSWORD, safe='')}@{host}/x"},
        2,
    )
    run(
        "status db down",
        ["status"],
        {
            **token_env,
            "DATABASE_URL": with_password(secret_db, DB_PASSWORD).replace(host, "127.0.0.1:9"),
        },
        1,
    )

    # `run` at debug level: one pass, then SIGTERM.
    before = await scalar(secret_db, "SELECT count(*) FROM sync_runs")
    child = spawn_convsync(
        ["run"], {**token_env, "CONVSYNC_INTERVAL": "3600", "CONVSYNC_HTTP_PORT": "0"}
    )

    async def pass_finished() -> bool:
        if child.poll() is not None:
            raise AssertionError(f"convsync run exited with {child.returncode} before its pass")
        finished = await scalar(
            secret_db, "SELECT count(*) FROM sync_runs WHERE status <> 'running'"
        )
        return bool(finished > before)

    try:
        await until(pass_finished, 30, "the service's pass to finish")
        child.send_signal(signal.SIGTERM)
        stdout, stderr = await asyncio.to_thread(child.communicate, timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.communicate()
    scan.check("run + SIGTERM", stdout, stderr)
    assert child.returncode == 0, stderr[-1500:]

    record(
        secret_commands=len(scan.commands),
        secret_lines_scanned=scan.lines,
        secrets_checked=len(scan.secrets),
        secrets_leaked=len(scan.leaks),
    )
    assert scan.leaks == [], "\n".join(scan.leaks[:20])
    assert scan.lines > 100, "the commands did log (debug level)"
