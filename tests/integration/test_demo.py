"""``convsync demo`` as a newcomer runs it: a child process, no Twilio variables, a database
(here the fixture's, so the embedded-PostgreSQL start, covered by the pgembed tests, is
skipped). What it prints must match what it stored, and what it stored must match the
simulator's dataset, rebuilt here from the demo's seed.
"""

from __future__ import annotations

import asyncio
import re
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import asyncpg
import pytest

from convsync_tools.cookbook import load_cookbook
from convsync_tools.demo import DEMO_QUERIES, DEMO_SEED, DEMO_SERVICES
from convsync_tools.simdata import DEMO_ACCOUNT_SID, Dataset
from convsync_tools.simulator import Simulator, SimulatorServer
from tests.harness import convsync, worker_env

USERS = 40
SUMMARY = re.compile(
    r"pass (?P<run_id>\d+) (?P<status>\w+) in [\d.]+ s\n"
    r"  users  (?P<synced>\d+) synced, (?P<failed>\d+) failed, (?P<gone>\d+) gone\n"
    r"  pages  (?P<pages>\d+) \([\d.]+ pages/s\)\n"
    r"  rows   (?P<inserted>\d+) inserted, (?P<updated>\d+) updated, (?P<unchanged>\d+) "
    r"unchanged, (?P<removed>\d+) removed, (?P<quarantined>\d+) quarantined"
)


async def demo(env: dict[str, str], users: int = USERS) -> Any:
    return await asyncio.to_thread(
        convsync, ["demo", "--users", str(users)], {"CONVSYNC_LOG_FORMAT": "json", **env}
    )


async def fetch(db_url: str, sql: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(db_url)
    try:
        rows: list[asyncpg.Record] = await conn.fetch(sql)
        return rows
    finally:
        await conn.close()


def summary_of(stdout: str) -> dict[str, Any]:
    match = SUMMARY.search(stdout)
    assert match, stdout
    return {k: v if k == "status" else int(v) for k, v in match.groupdict().items()}


async def test_demo_syncs_the_simulator_prints_a_summary_and_answers(db_url: str) -> None:
    result = await demo({"DATABASE_URL": db_url})
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "the simulator at http://127.0.0.1:" in out
    assert "DATABASE_URL (" in out
    assert "password" not in out

    # the summary is the pass as recorded
    summary = summary_of(out)
    runs = await fetch(db_url, "SELECT * FROM sync_runs")
    assert len(runs) == 1
    run = runs[0]
    assert summary == {
        "run_id": run["run_id"],
        "status": "succeeded",
        "synced": DEMO_SERVICES * USERS,
        "failed": 0,
        "gone": 0,
        "pages": run["pages"],
        "inserted": run["rows_inserted"],
        "updated": 0,
        "unchanged": 0,
        "removed": 0,
        "quarantined": 0,
    }

    # the database holds the demo dataset, membership by membership
    data = Dataset.generate(DEMO_SEED, DEMO_SERVICES, USERS)
    expected = {
        (m["chat_service_sid"], m["user_sid"], m["conversation_sid"], m["unread_messages_count"])
        for m in data.expected_memberships()
    }
    stored = await fetch(
        db_url,
        "SELECT chat_service_sid, user_sid, conversation_sid, unread_messages_count "
        "FROM user_conversations_v",
    )
    assert {tuple(r) for r in stored} == expected
    assert summary["inserted"] == len(expected)
    services = await fetch(db_url, "SELECT account_sid FROM services")
    assert [r["account_sid"] for r in services] == [DEMO_ACCOUNT_SID] * DEMO_SERVICES

    # each demo query printed its title and a table; the unread table leads with the right user
    titles = {q.name: q.title for q in load_cookbook()}
    for name in DEMO_QUERIES:
        assert f"{titles[name]}  (cookbook/{name}.sql" in out
    unread: dict[tuple[str, str], int] = defaultdict(int)
    for m in data.expected_memberships():
        unread[(m["chat_service_sid"], m["user_sid"])] += m["unread_messages_count"] or 0
    top = max(unread.items(), key=lambda kv: kv[1])
    identity = {(u["chat_service_sid"], u["sid"]): u["identity"] for u in data.expected_users()}
    section = out.split(titles["unread_per_user"], 1)[1]
    first_row = section.splitlines()[3]
    assert identity[top[0]] in first_row
    assert re.search(rf"\b{top[1]}\b", first_row)
    with_unread = sum(1 for v in unread.values() if v >= 1)
    assert f"({with_unread} rows, 5 shown)" in section
    assert "More in cookbook/:" in out


async def test_a_second_demo_finds_everything_in_place(db_url: str) -> None:
    first = await demo({"DATABASE_URL": db_url})
    assert first.returncode == 0, first.stderr[-3000:]
    second = await demo({"DATABASE_URL": db_url})
    assert second.returncode == 0, second.stderr[-3000:]
    before, after = summary_of(first.stdout), summary_of(second.stdout)
    assert after["run_id"] == before["run_id"] + 1
    assert (after["inserted"], after["removed"]) == (0, 0)
    # unchanged, or updated only in the API URLs if the simulator had to take another port
    assert after["unchanged"] + after["updated"] == before["inserted"]


async def test_the_demo_will_not_mix_simulated_data_into_a_real_account(db_url: str) -> None:
    foreign = "IS" + "0" * 32
    conn = await asyncpg.connect(db_url)
    try:
        await conn.execute(
            "INSERT INTO services (chat_service_sid, account_sid) VALUES ($1, $2)",
            foreign,
            "AC" + "1" * 32,
        )
    finally:
        await conn.close()
    result = await demo({"DATABASE_URL": db_url})
    assert result.returncode == 2
    assert "holds data of account AC1111" in result.stderr
    assert "unset DATABASE_URL" in result.stderr
    assert await fetch(db_url, "SELECT run_id FROM sync_runs") == []
    assert [r["chat_service_sid"] for r in await fetch(db_url, "SELECT * FROM services")] == [
        foreign
    ]


@pytest.fixture
def account() -> Iterator[SimulatorServer]:
    """Stands in for a real Twilio account: another dataset, reached only by credentials."""
    with SimulatorServer(
        Simulator(Dataset.generate(seed=99, services=1, users_per_service=7))
    ) as s:
        yield s


async def test_with_credentials_the_demo_syncs_that_account_and_starts_no_simulator(
    account: SimulatorServer, db_url: str
) -> None:
    result = await demo(worker_env(account, db_url))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"source    {account.url} as {DEMO_ACCOUNT_SID}" in result.stdout
    assert "the simulator at" not in result.stdout
    users = await fetch(db_url, "SELECT chat_service_sid, user_sid FROM users")
    assert {(r["chat_service_sid"], r["user_sid"]) for r in users} == {
        (u["chat_service_sid"], u["sid"]) for u in account.sim.dataset.expected_users()
    }
    assert summary_of(result.stdout)["synced"] == 7


async def test_a_wrong_users_count_is_a_usage_error(db_url: str) -> None:
    result = await demo({"DATABASE_URL": db_url}, users=-1)
    assert result.returncode == 2
    assert "--users must be between 0 and" in result.stderr
