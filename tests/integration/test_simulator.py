"""The Twilio simulator over a real socket: spec conformance, paging, auth, faults and stats."""

from __future__ import annotations

import asyncio
import copy
import gc
import json
import re
import sys
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any
from urllib.parse import quote, urlsplit

import aiohttp
import pytest
from multidict import CIMultiDictProxy

from convsync_tools.simdata import DEMO_AUTH_TOKEN, Dataset
from convsync_tools.simulator import Simulator, SimulatorConfig, SimulatorServer, freeze_heap
from tests.simulator_schema import check, errors

SERVICES = "/v1/Services"
SERVICE = "/v1/Services/{Sid}"
USERS = "/v1/Services/{ChatServiceSid}/Users"
USER = "/v1/Services/{ChatServiceSid}/Users/{Sid}"
MEMBERSHIPS = "/v1/Services/{ChatServiceSid}/Users/{UserSid}/Conversations"
DEFAULT_MEMBERSHIPS = "/v1/Users/{UserSid}/Conversations"
ERROR_KEYS = {"code", "message", "more_info", "status"}
KEY_SID = "SK" + "5" * 32


@pytest.fixture
def server() -> Iterator[SimulatorServer]:
    sim = Simulator(Dataset.generate(seed=11, services=2, users_per_service=24))
    with SimulatorServer(sim) as running:
        yield running


@pytest.fixture
async def http(server: SimulatorServer) -> AsyncIterator[aiohttp.ClientSession]:
    auth = aiohttp.encode_basic_auth(server.sim.config.account_sid, DEMO_AUTH_TOKEN)
    async with aiohttp.ClientSession(headers={"Authorization": auth}) as session:
        yield session


async def get(
    session: aiohttp.ClientSession, url: str, **kwargs: Any
) -> tuple[int, Any, CIMultiDictProxy[str]]:
    async with session.get(url, **kwargs) as response:
        return response.status, await response.json(), response.headers


async def walk(session: aiohttp.ClientSession, url: str, **kwargs: Any) -> list[Any]:
    """Every page from ``url`` on, by next_page_url."""
    pages = []
    next_url: str | None = url
    while next_url:
        status, body, _ = await get(session, next_url, **kwargs)
        assert status == 200, body
        pages.append(body)
        next_url = body["meta"]["next_page_url"]
    return pages


def assert_error(status: int, body: Any, expected_status: int, code: int) -> None:
    assert status == expected_status, body
    assert set(body) == ERROR_KEYS
    assert body["code"] == code
    assert body["status"] == expected_status
    assert body["more_info"] == f"https://www.twilio.com/docs/errors/{code}"
    assert isinstance(body["message"], str)
    assert body["message"]


def heavy_user(sim: Simulator) -> tuple[str, str]:
    """(service SID, user SID) of a user with more than two pages of 50."""
    service = sim.dataset.default_service_sid
    user = max(
        sim.dataset.user_sids(service), key=lambda u: sim.dataset.membership_count(service, u)
    )
    assert sim.dataset.membership_count(service, user) > 100
    return service, user


# -- the spec --------------------------------------------------------------------------------


async def test_every_endpoint_matches_the_spec(
    server: SimulatorServer, http: aiohttp.ClientSession
) -> None:
    data, url = server.sim.dataset, server.url
    items: list[dict[str, Any]] = []
    for page in await walk(http, f"{url}/v1/Services?PageSize=1"):
        check(SERVICES, page)
    for service in data.service_sids():
        status, body, _ = await get(http, f"{url}/v1/Services/{service}")
        assert status == 200
        check(SERVICE, body)
        for page in await walk(http, f"{url}/v1/Services/{service}/Users?PageSize=10"):
            check(USERS, page)
        for user in data.user_sids(service)[:3]:
            status, body, _ = await get(http, f"{url}/v1/Services/{service}/Users/{user}")
            assert status == 200
            check(USER, body)
        for user in data.user_sids(service):
            for page in await walk(http, f"{url}/v1/Services/{service}/Users/{user}/Conversations"):
                check(MEMBERSHIPS, page)
                items.extend(page["conversations"])
    for user in data.user_sids(data.default_service_sid)[:8]:
        for page in await walk(http, f"{url}/v1/Users/{user}/Conversations?PageSize=20"):
            check(DEFAULT_MEMBERSHIPS, page)
            for item in page["conversations"]:
                assert item["url"].startswith(f"{url}/v1/Users/{user}/Conversations/CH")
    # the nullable branches were exercised, not just the happy ones
    for field in ("friendly_name", "unique_name", "unread_messages_count", "created_by"):
        assert any(item[field] is None for item in items), field
        assert any(item[field] is not None for item in items), field
    assert {len(item["timers"]) for item in items} == {0, 1, 2}


async def test_the_validator_is_not_vacuous(
    server: SimulatorServer, http: aiohttp.ClientSession
) -> None:
    service, user = heavy_user(server.sim)
    status, page, _ = await get(
        http, f"{server.url}/v1/Services/{service}/Users/{user}/Conversations"
    )
    assert status == 200
    assert not errors(MEMBERSHIPS, page)
    breakages = {
        "date": ("date_created", "2015-07-30 20:00:00"),
        "pattern": ("conversation_sid", "CHnot-a-sid"),
        "enum": ("conversation_state", "open"),
        "relative url": ("url", "/v1/relative"),
        "type": ("unread_messages_count", "3"),
        "links": ("links", {"participant": "not a uri"}),
    }
    for name, (field, value) in breakages.items():
        broken = copy.deepcopy(page)
        broken["conversations"][0][field] = value
        assert errors(MEMBERSHIPS, broken), name
    extra = copy.deepcopy(page)
    extra["conversations"][0]["surprise"] = 1
    missing = copy.deepcopy(page)
    del missing["meta"]["key"]
    assert errors(MEMBERSHIPS, extra)
    assert errors(MEMBERSHIPS, missing)


# -- paging ----------------------------------------------------------------------------------


async def test_paging_returns_every_membership_exactly_once(
    server: SimulatorServer, http: aiohttp.ClientSession
) -> None:
    data, url = server.sim.dataset, server.url
    seen: list[dict[str, Any]] = []
    most_pages = 0
    for service in data.service_sids():
        for user in data.user_sids(service):
            first = f"{url}/v1/Services/{service}/Users/{user}/Conversations"
            pages = await walk(http, first)
            most_pages = max(most_pages, len(pages))
            for number, page in enumerate(pages):
                meta = page["meta"]
                assert meta["page"] == number
                assert meta["page_size"] == 50
                assert meta["key"] == "conversations"
                assert meta["first_page_url"] == f"{first}?PageSize=50&Page=0"
                assert (meta["previous_page_url"] is None) == (number == 0)
                assert len(page["conversations"]) == 50 or meta["next_page_url"] is None
                seen.extend(page["conversations"])
    assert seen == list(data.expected_memberships(url))
    assert most_pages >= 3
    stats = server.sim.stats()
    assert set(stats.pages.values()) == {1}  # no page was fetched twice
    assert stats.pages == stats.pages_ok


async def test_meta_url_is_the_page_fetched(
    server: SimulatorServer, http: aiohttp.ClientSession
) -> None:
    service, user = heavy_user(server.sim)
    first = f"{server.url}/v1/Services/{service}/Users/{user}/Conversations?PageSize=30"
    status, page, _ = await get(http, first)
    assert status == 200
    assert page["meta"]["url"] == first.replace("=30", "=30&Page=0")
    next_url = page["meta"]["next_page_url"]
    status, second, _ = await get(http, next_url)
    assert second["meta"]["url"] == next_url
    assert urlsplit(next_url).query.startswith("PageSize=30&Page=1&PageToken=PT")


async def test_previous_page_urls_walk_back(
    server: SimulatorServer, http: aiohttp.ClientSession
) -> None:
    service = server.sim.dataset.service_sids()[1]
    forward = await walk(http, f"{server.url}/v1/Services/{service}/Users?PageSize=7")
    assert len(forward) == 4
    assert [u for p in forward for u in p["users"]] == list(
        server.sim.dataset.expected_users(server.url, service)
    )
    page = forward[-1]
    for expected in reversed(forward[:-1]):
        status, page, _ = await get(http, page["meta"]["previous_page_url"])
        assert status == 200
        assert page["users"] == expected["users"]
        assert page["meta"]["page"] == expected["meta"]["page"]
    assert page["meta"]["previous_page_url"] is None


async def test_urls_are_absolute_for_the_request_host(
    server: SimulatorServer, http: aiohttp.ClientSession
) -> None:
    service, user = heavy_user(server.sim)
    path = f"/v1/Services/{service}/Users/{user}/Conversations"
    host = {"Host": "api.example.test:9999"}
    status, page, _ = await get(http, f"{server.url}{path}", headers=host)
    assert status == 200
    meta = page["meta"]
    for key in ("first_page_url", "url", "next_page_url"):
        assert meta[key].startswith(f"http://api.example.test:9999{path}?"), key
    for item in page["conversations"]:
        assert item["url"].startswith("http://api.example.test:9999/v1/")
        assert all(v.startswith("http://api.example.test:9999/v1/") for v in item["links"].values())
    # the token works from any host
    follow = server.url + meta["next_page_url"].removeprefix("http://api.example.test:9999")
    status, second, _ = await get(http, follow)
    assert status == 200
    assert second["meta"]["page"] == 1


@pytest.mark.parametrize("size", ["0", "51", "-1", "x", ""])
async def test_page_size_out_of_range_is_400(
    server: SimulatorServer, http: aiohttp.ClientSession, size: str
) -> None:
    service = server.sim.dataset.default_service_sid
    status, body, _ = await get(http, f"{server.url}/v1/Services/{service}/Users?PageSize={size}")
    assert_error(status, body, 400, 20001)


async def test_page_size_limits_per_endpoint(
    server: SimulatorServer, http: aiohttp.ClientSession
) -> None:
    service = server.sim.dataset.default_service_sid
    status, body, _ = await get(http, f"{server.url}/v1/Services/{service}/Users?PageSize=50")
    assert status == 200
    assert len(body["users"]) == 24
    status, body, _ = await get(http, f"{server.url}/v1/Services?PageSize=100")
    assert status == 200
    assert body["meta"]["page_size"] == 100
    status, body, _ = await get(http, f"{server.url}/v1/Services?PageSize=101")
    assert_error(status, body, 400, 20001)
    status, body, _ = await get(http, f"{server.url}/v1/Services?PageSize=1")
    assert len(body["services"]) == 1
    assert body["meta"]["next_page_url"]


@pytest.mark.parametrize("query", ["Page=1", "Page=-1", "Page=x", "Page=3&PageSize=5"])
async def test_page_past_the_first_needs_a_token(
    server: SimulatorServer, http: aiohttp.ClientSession, query: str
) -> None:
    service = server.sim.dataset.default_service_sid
    status, body, _ = await get(http, f"{server.url}/v1/Services/{service}/Users?{query}")
    assert_error(status, body, 400, 20001)


async def test_bad_page_tokens_are_400(
    server: SimulatorServer, http: aiohttp.ClientSession
) -> None:
    service, user = heavy_user(server.sim)
    users_url = f"{server.url}/v1/Services/{service}/Users?PageSize=5"
    _, page, _ = await get(http, users_url)
    token = urlsplit(page["meta"]["next_page_url"]).query.split("PageToken=")[1]
    tampered = token[:10] + ("A" if token[10] != "A" else "B") + token[11:]
    conversations = f"{server.url}/v1/Services/{service}/Users/{user}/Conversations"
    for bad in (f"{users_url}&Page=1&PageToken={tampered}",
                f"{users_url}&Page=1&PageToken=PTgarbage",
                f"{users_url}&Page=1&PageToken=nonsense",
                f"{conversations}?Page=1&PageToken={token}"):  # fmt: skip
        status, body, _ = await get(http, bad)
        assert_error(status, body, 400, 20001)
        assert "PageToken" in body["message"]


async def test_page_tokens_expire(server: SimulatorServer, http: aiohttp.ClientSession) -> None:
    sim = server.sim
    service, user = heavy_user(sim)
    first = f"{server.url}/v1/Services/{service}/Users/{user}/Conversations"
    _, page, _ = await get(http, first)
    sim.advance_clock(3600)
    status, body, _ = await get(http, page["meta"]["next_page_url"])
    assert status == 200  # no expiry by default
    sim.configure(token_ttl=60)
    _, page, _ = await get(http, first)
    # Tokens carry whole seconds: stay well inside the TTL, then well past it.
    sim.advance_clock(30)
    status, body, _ = await get(http, page["meta"]["next_page_url"])
    assert status == 200
    sim.advance_clock(32)
    status, body, _ = await get(http, page["meta"]["next_page_url"])
    assert_error(status, body, 400, 20001)
    assert "expired" in body["message"]
    fresh = body  # a new first page hands out fresh tokens
    _, fresh, _ = await get(http, first)
    status, _, _ = await get(http, fresh["meta"]["next_page_url"])
    assert status == 200


async def test_tokens_are_keyset_positions(
    server: SimulatorServer, http: aiohttp.ClientSession
) -> None:
    data = server.sim.dataset
    service, user = heavy_user(server.sim)
    first = f"{server.url}/v1/Services/{service}/Users/{user}/Conversations?PageSize=10"
    _, page, _ = await get(http, first)
    marker = page["conversations"][-1]["conversation_sid"]
    before = [m["conversation_sid"] for m in data.memberships(service, user)]
    data.remove_membership(service, user, marker)  # the last item seen
    data.remove_membership(service, user, before[10])  # the next one
    data.remove_membership(service, user, before[0])  # one already seen
    data.add_membership(service, user)  # sorts last
    _, second, _ = await get(http, page["meta"]["next_page_url"])
    expected = [c for c in (m["conversation_sid"] for m in data.memberships(service, user))
                if c > marker][:10]  # fmt: skip
    assert [m["conversation_sid"] for m in second["conversations"]] == expected
    assert expected[0] == before[11]


# -- auth and errors ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "Basic " + "!!!",
        "Bearer token",
        aiohttp.encode_basic_auth("AC" + "0" * 32, DEMO_AUTH_TOKEN),
        "wrong-token",
        aiohttp.encode_basic_auth(KEY_SID, "key-secret"),  # keys not configured
    ],
)
async def test_bad_credentials_are_401(server: SimulatorServer, authorization: str | None) -> None:
    if authorization == "wrong-token":
        authorization = aiohttp.encode_basic_auth(server.sim.config.account_sid, "nope")
    headers = {"Authorization": authorization} if authorization else {}
    async with aiohttp.ClientSession() as session:
        status, body, response_headers = await get(
            session, f"{server.url}/v1/Services", headers=headers
        )
    assert_error(status, body, 401, 20003)
    assert response_headers["WWW-Authenticate"].startswith("Basic")


async def test_api_keys_are_accepted_when_configured(server: SimulatorServer) -> None:
    server.sim.configure(api_key_sid=KEY_SID, api_key_secret="key-secret")
    for login, password in (
        (KEY_SID, "key-secret"),
        (server.sim.config.account_sid, DEMO_AUTH_TOKEN),
    ):
        headers = {"Authorization": aiohttp.encode_basic_auth(login, password)}
        async with aiohttp.ClientSession(headers=headers) as session:
            status, _, _ = await get(session, f"{server.url}/v1/Services")
        assert status == 200
    with pytest.raises(ValueError, match="go together"):
        server.sim.configure(api_key_secret=None)


async def test_unknown_and_deleted_resources_are_404(
    server: SimulatorServer, http: aiohttp.ClientSession
) -> None:
    data, url = server.sim.dataset, server.url
    service = data.default_service_sid
    user = data.user_sids(service)[2]
    for path in (
        f"/v1/Services/IS{'0' * 32}",
        f"/v1/Services/IS{'0' * 32}/Users",
        f"/v1/Services/{service}/Users/US{'0' * 32}/Conversations",
        f"/v1/Services/{service}/Users/nobody@example.com/Conversations",
        f"/v1/Services/{data.service_sids()[1]}/Users/{user}/Conversations",  # other service
        "/v1/Conversations",
        "/v2/Services",
        "/",
    ):
        status, body, _ = await get(http, url + path)
        assert_error(status, body, 404, 20404)
    conversations = f"{url}/v1/Services/{service}/Users/{user}/Conversations"
    status, _, _ = await get(http, conversations)
    assert status == 200
    data.delete_user(service, user)
    status, body, _ = await get(http, conversations)
    assert_error(status, body, 404, 20404)
    status, body, _ = await get(http, f"{url}/v1/Users/{user}/Conversations")
    assert_error(status, body, 404, 20404)
    async with http.post(f"{url}/v1/Services") as response:
        assert_error(response.status, await response.json(), 405, 20004)


async def test_users_are_addressed_by_identity(
    server: SimulatorServer, http: aiohttp.ClientSession
) -> None:
    data, url = server.sim.dataset, server.url
    service = data.default_service_sid
    identity = "zoë +1 例@exámple.com"
    sid = data.add_user(service, identity=identity)
    for _ in range(3):
        data.add_membership(service, sid)
    identities = [u["identity"] for u in data.expected_users(service_sid=service)][:5]
    for who in [identity, *identities]:
        user = data.user_sids(service)[data.user_index(0, who) or 0]
        by_sid = await walk(http, f"{url}/v1/Services/{service}/Users/{user}/Conversations")
        by_identity = await walk(
            http, f"{url}/v1/Services/{service}/Users/{quote(who, safe='')}/Conversations"
        )
        assert [p["conversations"] for p in by_identity] == [p["conversations"] for p in by_sid]
        default = await walk(http, f"{url}/v1/Users/{quote(who, safe='')}/Conversations")
        assert sum(len(p["conversations"]) for p in default) == data.membership_count(service, who)
    status, body, _ = await get(http, f"{url}/v1/Services/{service}/Users/{quote(identity)}")
    assert status == 200
    assert body["sid"] == sid
    assert body["identity"] == identity


# -- faults ----------------------------------------------------------------------------------


async def test_requests_above_the_ceiling_get_429(
    server: SimulatorServer, http: aiohttp.ClientSession
) -> None:
    sim = server.sim
    sim.configure(concurrency_ceiling=3, retry_after=2)
    sim.hold()
    url = f"{server.url}/v1/Services"
    tasks = [asyncio.create_task(get(http, url)) for _ in range(5)]
    done: set[asyncio.Task[Any]] = set()
    while len(done) < 2:
        finished, _ = await asyncio.wait(
            [t for t in tasks if t not in done], timeout=10, return_when=asyncio.FIRST_COMPLETED
        )
        assert finished, "the requests above the ceiling were not answered at once"
        done |= finished
    assert len(done) == 2
    for task in done:
        status, body, headers = task.result()
        assert_error(status, body, 429, 20429)
        assert headers["Retry-After"] == "2"
    assert await asyncio.to_thread(sim.wait_until, lambda s: s.in_flight == 3)
    sim.release()
    results = await asyncio.gather(*tasks)
    assert sorted(status for status, _, _ in results) == [200, 200, 200, 429, 429]
    stats = sim.stats()
    assert stats.max_in_flight == 3
    assert stats.in_flight == 0
    assert stats.faults["ceiling"] == 2
    assert stats.by_status == {200: 3, 429: 2}

    sim.configure(retry_after=None, concurrency_ceiling=1)
    sim.hold()
    held = asyncio.create_task(get(http, url))
    assert await asyncio.to_thread(sim.wait_until, lambda s: s.in_flight == 1)
    status, body, headers = await get(http, url)
    assert_error(status, body, 429, 20429)
    assert "Retry-After" not in headers
    sim.release()
    assert (await held)[0] == 200


async def test_random_faults_follow_the_seed(
    server: SimulatorServer, http: aiohttp.ClientSession
) -> None:
    sim = server.sim
    url = f"{server.url}/v1/Services"

    async def statuses() -> list[int]:
        sim.configure(rate_429=0.15, rate_500=0.25, rate_503=0.2, fault_seed=42)
        found = []
        for _ in range(40):
            status, body, _ = await get(http, url)
            if status != 200:
                assert_error(status, body, status, {429: 20429, 500: 20500, 503: 20503}[status])
            found.append(status)
        return found

    first = await statuses()
    assert set(first) == {200, 429, 500, 503}
    assert await statuses() == first
    faults = sim.stats().faults
    assert faults["500"] == 2 * first.count(500)
    assert faults["429"] == 2 * first.count(429)
    with pytest.raises(ValueError, match="sum to at most 1"):
        sim.configure(rate_500=0.9)


async def test_api_down_is_503_for_everything(
    server: SimulatorServer, http: aiohttp.ClientSession
) -> None:
    server.sim.configure(api_down=True, retry_after=5)
    async with aiohttp.ClientSession() as anonymous:
        for session in (http, anonymous):
            status, body, headers = await get(session, f"{server.url}/v1/Services")
            assert_error(status, body, 503, 20503)
            assert headers["Retry-After"] == "5"
    server.sim.configure(api_down=False)
    status, _, _ = await get(http, f"{server.url}/v1/Services")
    assert status == 200


async def test_fail_next_hits_only_matching_requests(
    server: SimulatorServer, http: aiohttp.ClientSession
) -> None:
    sim = server.sim
    service, user = heavy_user(sim)
    path = f"/v1/Services/{service}/Users/{user}/Conversations"
    _, page, _ = await get(http, server.url + path)
    sim.fail_next("PageToken=", 500, count=2)
    status, _, _ = await get(http, f"{server.url}/v1/Services")  # does not match
    assert status == 200
    second = page["meta"]["next_page_url"]
    results = [(await get(http, second))[0] for _ in range(3)]
    assert results == [500, 500, 200]
    token = urlsplit(second).query.split("PageToken=")[1]
    stats = sim.stats()
    assert stats.pages[(path, token)] == 3
    assert stats.pages_ok[(path, token)] == 1
    assert stats.pages[(path, None)] == 1
    with pytest.raises(ValueError, match="fault must be"):
        sim.fail_next("x", "explode")
    with pytest.raises(ValueError, match="within 400"):
        sim.fail_next("x", 200)


async def raw_get(server: SimulatorServer, path: str) -> tuple[dict[str, str], bytes]:
    """One request on a fresh socket, read to EOF: (headers, body); ({}, b"") if dropped."""
    parts = urlsplit(server.url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    auth = aiohttp.encode_basic_auth(server.sim.config.account_sid, DEMO_AUTH_TOKEN)
    writer.write(
        f"GET {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nAuthorization: {auth}\r\n"
        "Connection: close\r\n\r\n".encode()
    )
    await writer.drain()
    data = await reader.read()
    writer.close()
    await writer.wait_closed()
    if not data:
        return {}, b""
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")[1:]
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return headers, body


async def test_dropped_connections_send_nothing(
    server: SimulatorServer, http: aiohttp.ClientSession
) -> None:
    sim = server.sim
    path = f"/v1/Services/{sim.dataset.default_service_sid}"
    sim.fail_next(path, "drop")
    assert await raw_get(server, path) == ({}, b"")
    sim.fail_next(path, "drop", count=2)  # aiohttp resends once on a dropped connection
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await get(http, server.url + path)
    status, _, _ = await get(http, server.url + path)
    assert status == 200
    stats = sim.stats()
    assert stats.faults["drop"] == 3
    assert stats.by_status == {200: 1}


async def test_truncated_bodies_are_cut_short(
    server: SimulatorServer, http: aiohttp.ClientSession
) -> None:
    sim = server.sim
    path = f"/v1/Services/{sim.dataset.default_service_sid}"
    headers, full = await raw_get(server, path)
    assert int(headers["content-length"]) == len(full)
    assert json.loads(full)
    sim.fail_next(path, "truncate")
    headers, cut = await raw_get(server, path)
    assert int(headers["content-length"]) == len(full)
    assert len(cut) == len(full) // 2
    assert full.startswith(cut)
    sim.fail_next(path, "truncate")
    with pytest.raises(aiohttp.ClientPayloadError):
        await get(http, server.url + path)
    stats = sim.stats()
    assert stats.faults["truncate"] == 2
    assert stats.pages_ok[(path, None)] == 1


async def test_slow_responses_outlast_client_timeouts(
    server: SimulatorServer, http: aiohttp.ClientSession
) -> None:
    sim = server.sim
    sim.configure(slow_seconds=60)
    sim.fail_next("/v1/Services", "slow")
    with pytest.raises(TimeoutError):
        await get(http, f"{server.url}/v1/Services", timeout=aiohttp.ClientTimeout(total=0.3))
    # the abandoned request stops counting once the client hangs up
    assert await asyncio.to_thread(sim.wait_until, lambda s: s.in_flight == 0)
    assert sim.stats().faults["slow"] == 1
    status, _, _ = await get(http, f"{server.url}/v1/Services")
    assert status == 200


async def test_latency_does_not_block_other_requests(
    server: SimulatorServer, http: aiohttp.ClientSession
) -> None:
    sim = server.sim
    sim.configure(latency_ms=150, jitter_ms=20)
    started = time.monotonic()
    results = await asyncio.gather(*(get(http, f"{server.url}/v1/Services") for _ in range(8)))
    assert time.monotonic() - started >= 0.15
    assert all(status == 200 for status, _, _ in results)
    stats = sim.stats()
    assert stats.max_in_flight >= 2  # a blocking sleep would serialize them
    assert 0 < stats.avg_in_flight <= stats.max_in_flight


async def test_the_active_window_leaves_out_idle_time_before_and_after(
    server: SimulatorServer, http: aiohttp.ClientSession
) -> None:
    sim = server.sim
    sim.configure(latency_ms=100)
    sim.reset_stats()
    await asyncio.sleep(0.2)  # idle before the first request
    await asyncio.gather(*(get(http, f"{server.url}/v1/Services") for _ in range(4)))
    await asyncio.sleep(0.2)  # and after the last
    stats, served = sim.stats(), sim.served()
    first, last = min(s.arrived for s in served), max(s.answered for s in served)
    assert stats.active_seconds == pytest.approx(last - first, abs=0.01)
    busy = sum(s.answered - s.arrived for s in served)  # the in-flight area
    assert stats.active_avg_in_flight * stats.active_seconds == pytest.approx(busy, rel=0.05)
    assert stats.avg_in_flight < stats.active_avg_in_flight / 2  # 0.4 s of idle in the former


# -- stats and control -----------------------------------------------------------------------


async def test_stats_count_requests_and_pages(
    server: SimulatorServer, http: aiohttp.ClientSession
) -> None:
    sim = server.sim
    service = sim.dataset.default_service_sid
    pages = await walk(http, f"{server.url}/v1/Services/{service}/Users?PageSize=10")
    await get(http, f"{server.url}/v1/Services/{service}/Users?PageSize=10")
    async with aiohttp.ClientSession() as anonymous:
        await get(anonymous, f"{server.url}/v1/Services")
    stats = sim.stats()
    assert stats.requests == len(pages) + 2
    assert stats.by_status == {200: len(pages) + 1, 401: 1}
    users_path = f"/v1/Services/{service}/Users"
    assert stats.pages[(users_path, None)] == 2
    tokens = [urlsplit(p["meta"]["next_page_url"]).query.split("PageToken=")[1] for p in pages[:-1]]
    assert all(stats.pages[(users_path, token)] == 1 for token in tokens)
    assert stats.in_flight == 0
    assert stats.max_in_flight == 1
    async with aiohttp.ClientSession() as control:
        async with control.get(f"{server.url}/_sim/stats") as response:
            remote = await response.json()
        assert remote["requests"] == stats.requests
        assert remote["by_status"] == {"200": len(pages) + 1, "401": 1}
        assert {"path": users_path, "page_token": None, "count": 2} in remote["pages"]
        async with control.post(f"{server.url}/_sim/reset_stats") as response:
            assert response.status == 200
    cleared = sim.stats()
    assert cleared.requests == 0
    assert not cleared.pages
    assert not cleared.by_status


async def test_control_endpoints_change_knobs(
    server: SimulatorServer, http: aiohttp.ClientSession
) -> None:
    url = server.url
    async with aiohttp.ClientSession() as control:
        async with control.post(f"{url}/_sim/config", json={"api_down": True}) as response:
            shown = await response.json()
            assert response.status == 200
            assert shown["api_down"] is True
            assert "auth_token" not in shown
            assert DEMO_AUTH_TOKEN not in json.dumps(shown)
        status, _, _ = await get(http, f"{url}/v1/Services")
        assert status == 503
        for bad in ({"nope": 1}, {"latency_ms": "slow"}, {"api_down": 1}, {"rate_500": 2.0}):
            async with control.post(f"{url}/_sim/config", json=bad) as response:
                assert response.status == 400, bad
        async with control.post(f"{url}/_sim/config", json={"api_down": False}):
            pass
        body = {"path": "/v1/Services", "fault": 500, "count": 1}
        async with control.post(f"{url}/_sim/fail_next", json=body) as response:
            assert response.status == 200
        assert (await get(http, f"{url}/v1/Services"))[0] == 500
        assert (await get(http, f"{url}/v1/Services"))[0] == 200
        async with control.post(f"{url}/_sim/clock", json={"advance": 10}) as response:
            assert (await response.json())["now"] >= time.time() + 9
        async with control.get(f"{url}/_sim/unknown") as response:
            assert response.status == 404
    assert server.sim.stats().requests == 3  # control requests are not counted


# -- runners ---------------------------------------------------------------------------------


async def test_server_starts_and_stops_cleanly() -> None:
    config = SimulatorConfig(auth_token="t0ken")
    server = SimulatorServer(Simulator(Dataset.generate(seed=2, users_per_service=3), config))
    with server:
        assert server.url.startswith("http://127.0.0.1:")
        assert server.port > 0
        headers = {"Authorization": aiohttp.encode_basic_auth(config.account_sid, "t0ken")}
        async with aiohttp.ClientSession(headers=headers) as session:
            assert (await get(session, f"{server.url}/v1/Services"))[0] == 200
        with pytest.raises(RuntimeError, match="already started"):
            server.start()
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.ClientConnectorError):
            await get(session, f"{server.url}/v1/Services")


async def run_simulate(*args: str) -> tuple[str, list[str], asyncio.subprocess.Process]:
    code = (
        "import sys; from convsync_tools.simulator import simulate_main; "
        "sys.exit(simulate_main(sys.argv[1:]))"
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, "--port", "0", "--users", "5", *args,
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert process.stdout is not None
    first = (await asyncio.wait_for(process.stdout.readline(), 30)).decode().strip()
    second = (await asyncio.wait_for(process.stdout.readline(), 5)).decode().strip()
    assert first.startswith("simulator listening on http://127.0.0.1:"), first
    return first.rsplit(" ", 1)[1], [first, second], process


async def stop(process: asyncio.subprocess.Process) -> int:
    process.terminate()
    return await asyncio.wait_for(process.wait(), 10)


async def test_simulate_command_serves_with_demo_credentials() -> None:
    url, lines, process = await run_simulate("--seed", "3", "--latency-ms", "1")
    try:
        assert DEMO_AUTH_TOKEN in lines[1]  # the demo token is not a secret
        account = lines[1].split("TWILIO_ACCOUNT_SID=")[1].split()[0]
        headers = {"Authorization": aiohttp.encode_basic_auth(account, DEMO_AUTH_TOKEN)}
        async with aiohttp.ClientSession(headers=headers) as session:
            status, body, _ = await get(session, f"{url}/v1/Services")
        assert status == 200
        assert body["services"][0]["account_sid"] == account
    finally:
        assert await stop(process) == 0


async def test_simulate_command_derive_serves_the_same_pages() -> None:
    """``--derive`` (the demo's: the dataset derived before it listens) changes no byte."""
    pages: list[list[Any]] = []
    for args in ((), ("--derive",)):
        url, lines, process = await run_simulate("--seed", "3", *args)
        try:
            account = lines[1].split("TWILIO_ACCOUNT_SID=")[1].split()[0]
            headers = {"Authorization": aiohttp.encode_basic_auth(account, DEMO_AUTH_TOKEN)}
            async with aiohttp.ClientSession(headers=headers) as session:
                _, services, _ = await get(session, f"{url}/v1/Services")
                service = services["services"][0]["sid"]
                _, users, _ = await get(session, f"{url}/v1/Services/{service}/Users")
                walked = [users]
                for user in users["users"]:
                    path = f"/v1/Services/{service}/Users/{user['sid']}/Conversations"
                    walked.append((await get(session, url + path))[1])
            # A page token carries the second it was issued: the two simulators answered apart.
            text = re.sub(r"PageToken=[^\"&]+", "PageToken=T", json.dumps(walked))
            pages.append(json.loads(text.replace(url, "URL")))
        finally:
            assert await stop(process) == 0
    assert pages[0] == pages[1]
    assert sum(len(page.get("conversations", ())) for page in pages[0]) > 0


def test_a_derived_dataset_is_frozen_out_of_the_collectors_passes() -> None:
    """``convsync simulate`` freezes what it built before listening: a full collection would
    walk every record of a derived dataset, stopping the simulator's loop meanwhile."""
    dataset = Dataset.generate(seed=3, users_per_service=20)
    dataset.derive()
    frozen = gc.get_freeze_count()
    try:
        freeze_heap()
        assert gc.get_freeze_count() > frozen
        assert all(obj is not dataset for obj in gc.get_objects())  # in no generation now
    finally:
        gc.unfreeze()
    assert any(obj is dataset for obj in gc.get_objects())


async def test_simulate_command_never_prints_a_given_token() -> None:
    token = "s3cret-given-token"
    account = "AC" + "1" * 32
    url, lines, process = await run_simulate(
        "--account-sid", account, "--auth-token", token, "--ceiling", "4"
    )
    try:
        assert token not in "\n".join(lines)
        headers = {"Authorization": aiohttp.encode_basic_auth(account, token)}
        async with aiohttp.ClientSession(headers=headers) as session:
            status, _body, _ = await get(session, f"{url}/v1/Services")
            assert status == 200
            async with session.get(f"{url}/_sim/config") as response:
                assert (await response.json())["concurrency_ceiling"] == 4
    finally:
        assert await stop(process) == 0
