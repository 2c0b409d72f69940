"""The ceiling: a bare aiohttp client walking the same pages convsync walks, no database.

Services, then each service's users listing (pages in order) streamed into ``concurrency``
workers, each walking one user's conversation pages in order by ``next_page_url``. One
connection pool of ``concurrency`` connections bounds every request, as convsync's limiter does.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any

import aiohttp


@dataclass(frozen=True)
class WalkResult:
    """What the walk fetched and how long it took."""

    seconds: float
    pages: int  # every API page: services, users, conversations
    conversation_pages: int
    users: int
    rows: int  # conversation memberships listed

    @property
    def pages_per_second(self) -> float:
        return self.pages / self.seconds if self.seconds else 0.0


class _Walker:
    def __init__(self, session: aiohttp.ClientSession, base_url: str, page_size: int) -> None:
        self.session = session
        self.base_url = base_url
        self.page_size = page_size
        self.pages = self.conversation_pages = self.users = self.rows = 0

    async def get(self, url: str) -> dict[str, Any]:
        async with self.session.get(url) as response:
            raw = await response.read()
            if response.status != 200:
                raise RuntimeError(f"GET {url.split('?')[0]}: HTTP {response.status}")
        self.pages += 1
        body: dict[str, Any] = json.loads(raw)
        return body

    async def listing(self, url: str, key: str) -> Any:
        """Yield the items of every page of a listing, in order."""
        next_url: str | None = url
        while next_url:
            body = await self.get(next_url)
            for item in body[key]:
                yield item
            next_url = body["meta"]["next_page_url"]

    async def discover(self, queue: asyncio.Queue[tuple[str, str] | None], workers: int) -> None:
        services = self.listing(
            f"{self.base_url}/v1/Services?PageSize={self.page_size}", "services"
        )
        async for service in services:
            sid = service["sid"]
            users_url = f"{self.base_url}/v1/Services/{sid}/Users?PageSize={self.page_size}"
            async for user in self.listing(users_url, "users"):
                await queue.put((sid, user["sid"]))
        for _ in range(workers):
            await queue.put(None)

    async def work(self, queue: asyncio.Queue[tuple[str, str] | None]) -> None:
        while (job := await queue.get()) is not None:
            service, user = job
            next_url: str | None = (
                f"{self.base_url}/v1/Services/{service}/Users/{user}/Conversations"
                f"?PageSize={self.page_size}"
            )
            while next_url:
                body = await self.get(next_url)
                self.conversation_pages += 1
                self.rows += len(body["conversations"])
                next_url = body["meta"]["next_page_url"]
            self.users += 1


async def walk(
    base_url: str, account_sid: str, auth_token: str, concurrency: int, page_size: int = 50
) -> WalkResult:
    """Fetch every page of every user's conversations listing at ``concurrency``."""
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(
        connector=connector,
        auth=aiohttp.BasicAuth(account_sid, auth_token),
        headers={"Accept": "application/json"},
    ) as session:
        walker = _Walker(session, base_url, page_size)
        queue: asyncio.Queue[tuple[str, str] | None] = asyncio.Queue(maxsize=4 * concurrency)
        started = time.perf_counter()
        await asyncio.gather(
            walker.discover(queue, concurrency), *(walker.work(queue) for _ in range(concurrency))
        )
        seconds = time.perf_counter() - started
    return WalkResult(seconds, walker.pages, walker.conversation_pages, walker.users, walker.rows)
