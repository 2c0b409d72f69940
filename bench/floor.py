"""The worker's floor: its own Twilio client (aiohttp, limiter, retries, the typed decode) and
its own checks of every conversations page, walking the pages convsync walks, with no database.

``python -m bench.floor`` runs in a process of its own, configured by the worker's environment
variables, and is timed whole by its parent (``bench.convsync_run.run_floor``) as ``convsync
sync`` is, start-up included. What a pass costs beyond it is what the database brings: its
imports and connections, claims, the group commit, the cursors. Discovery here is one loop
over each service's users pages (the pass runs two, prefetching). Prints one JSON line:
pages, conversation pages, users, rows, seconds.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

from bench.ceiling import WalkResult
from worker import client as api
from worker.client import TwilioClient
from worker.config import Settings, load_settings
from worker.logs import configure_logging
from worker.loop import run
from worker.model import decode_conversations_page, decode_users_page, parse_services_page


class _Floor:
    """The walk's state: the client, and what it fetched."""

    def __init__(self, client: TwilioClient, page_size: int) -> None:
        self.client = client
        self.page_size = page_size
        self.pages = self.conversation_pages = self.users = self.rows = 0

    async def service_sids(self) -> list[str]:
        """The services listed (as the pass discovers them: its parser, every page in order)."""
        sids: list[str] = []
        path: str | None = api.services_path(self.page_size)
        while path is not None:
            page = await self.client.get_page(path, "services")
            self.pages += 1
            sids += [row.chat_service_sid for row in parse_services_page(page.items).rows]
            path = page.next_page_path
        return sids

    async def discover(self, queue: asyncio.Queue[tuple[str, str] | None], workers: int) -> None:
        """Each service's users, queued page by page as the pass's discovery streams them."""
        for service in await self.service_sids():
            path: str | None = api.users_path(service, self.page_size)
            while path is not None:
                page = await self.client.get_page(path, "users")
                self.pages += 1
                for row in decode_users_page(page.body, page.items, service).rows:
                    await queue.put((service, row.user_sid))
                path = page.next_page_path
        for _ in range(workers):
            await queue.put(None)

    async def work(self, queue: asyncio.Queue[tuple[str, str] | None]) -> None:
        """Walk the queued users' conversations listings, one user at a time."""
        while (job := await queue.get()) is not None:
            service, user = job
            path: str | None = api.user_conversations_path(service, user, self.page_size)
            while path is not None:
                page = await self.client.get_page(path, "conversations")
                parsed = decode_conversations_page(page.body, page.items, service, user)
                self.pages += 1
                self.conversation_pages += 1
                self.rows += len(parsed.sids)
                path = page.next_page_path
            self.users += 1


async def walk_without_database(settings: Settings) -> WalkResult:
    """Every page of every user's conversations listing, at ``CONVSYNC_CONCURRENCY``."""
    async with TwilioClient(settings) as client:
        floor = _Floor(client, settings.page_size)
        queue: asyncio.Queue[tuple[str, str] | None] = asyncio.Queue(4 * settings.concurrency)
        started = time.perf_counter()
        await asyncio.gather(
            floor.discover(queue, settings.concurrency),
            *(floor.work(queue) for _ in range(settings.concurrency)),
        )
        seconds = time.perf_counter() - started
    return WalkResult(seconds, floor.pages, floor.conversation_pages, floor.users, floor.rows)


def main() -> int:
    settings = load_settings()
    # As the worker logs (its retries, say), to stderr: stdout carries the result alone.
    configure_logging(settings.log_level, settings.log_format, settings.secrets(), sys.stderr)
    result = run(walk_without_database(settings), settings.event_loop)
    print(json.dumps(result.__dict__))
    return 0


if __name__ == "__main__":
    sys.exit(main())
