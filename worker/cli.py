"""``convsync`` commands and their exit codes.

Exit codes: 0 success; 1 some users failed, or the pass was interrupted or could not go on (the
API or the database unavailable past every retry, an unexpected error; its progress is kept);
2 configuration or credentials are wrong (nothing retried). A failure is one structured,
redacted log line (``command_failed``), never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import asyncpg
import structlog

from worker import loop, progress, signals
from worker.client import TwilioClient
from worker.config import (
    SERVICE_SID,
    USER_SID,
    Settings,
    load_settings,
    parse_sids,
    secret_values,
)
from worker.database import LOGIN_REFUSED_ERRORS, close_store
from worker.errors import ConfigError, ConvsyncError, DatabaseUnreachable, FatalError
from worker.logs import configure_logging, redact, scrub
from worker.migrate import apply_migrations, pending_migrations
from worker.store import Store, recent_passes, troubled_users
from worker.sync import Scope, SyncPass

log = structlog.get_logger("convsync")

EXIT_OK, EXIT_PARTIAL, EXIT_CONFIG = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="convsync", description="Sync Twilio Conversations user memberships into PostgreSQL."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("migrate", help="apply migrations/*.sql (needs only DATABASE_URL)")
    sync = commands.add_parser("sync", help="run one pass now, then exit")
    sync.add_argument(
        "--service",
        action="append",
        default=[],
        metavar="IS...",
        help="only this service (repeatable); default: CONVSYNC_SERVICES or all",
    )
    sync.add_argument(
        "--user",
        action="append",
        default=[],
        metavar="US...",
        help="only this user (repeatable); skips users discovery",
    )
    status = commands.add_parser("status", help="the last passes and users failing or mid-listing")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.add_argument("--limit", type=_count, default=10, help="passes to show")
    commands.add_parser("simulate", help="serve the bundled Twilio simulator (see --help)")
    commands.add_parser("run", help="long-running: scheduled passes, /healthz, /metrics")
    demo = commands.add_parser("demo", help="simulator + local Postgres + one pass + queries")
    demo.add_argument("--users", type=int, default=300, help="simulated users per service")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    signals.install_early()  # first: as a container's PID 1, SIGTERM is ignored until handled
    try:
        return _main(list(sys.argv[1:] if argv is None else argv))
    except KeyboardInterrupt:  # SIGTERM or SIGINT before the event loop took them over
        return EXIT_PARTIAL


def _main(argv: list[str]) -> int:
    if argv[:1] == ["simulate"]:
        # Tooling, imported for this command only (worker/ruff.toml allows no other import of
        # it); the simulator has its own options and shares nothing with the worker.
        from convsync_tools.simulator import simulate_main

        return simulate_main(argv[1:])
    args = build_parser().parse_args(argv)
    settings: Settings | None = None
    try:
        settings = load_settings()
        configure_logging(settings.log_level, settings.log_format, settings.secrets())
        return loop.run(_command(args, settings), settings.event_loop)
    except FatalError as error:
        return _fail(args.command, error, settings, EXIT_CONFIG)
    except ConvsyncError as error:
        # Not fatal (e.g. the API or the database unreachable past every retry): try later.
        return _fail(args.command, error, settings, EXIT_PARTIAL)
    except KeyboardInterrupt:
        return EXIT_PARTIAL
    except Exception as error:  # a bug, or a failure nothing below knew: still one line
        return _fail(args.command, error, settings, EXIT_PARTIAL)


async def _command(args: argparse.Namespace, settings: Settings) -> int:
    """The command, with SIGTERM/SIGINT routed to it: a command cancelled by a signal exits 1
    (what it committed is kept; a migration is applied whole or not at all)."""
    stops = signals.StopSignals()
    with stops.attached():
        try:
            return await _dispatch(args, settings, stops)
        except (asyncio.CancelledError, Exception):
            if not stops.cancelled:
                raise
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            print(f"convsync: {args.command} stopped by {stops.received}", file=sys.stderr)
            return EXIT_PARTIAL


def _fail(command: str, error: Exception, settings: Settings | None, code: int) -> int:
    """Log the one line a failed command ends with (redacted, no traceback); its exit code."""
    if settings is None:  # the configuration itself was refused: log with the defaults
        fmt = os.environ.get("CONVSYNC_LOG_FORMAT", "auto").strip().lower()
        fmt = fmt if fmt in ("json", "console") else "auto"
        configure_logging("info", fmt, secret_values(os.environ))
    message = str(error) if isinstance(error, ConvsyncError) else f"internal error: {error}"
    log.error(
        "command_failed",
        command=command,
        error=redact(message)[:2000],
        error_kind=type(error).__name__,
        exit_code=code,
    )
    return code


async def _dispatch(
    args: argparse.Namespace, settings: Settings, stops: signals.StopSignals
) -> int:
    if args.command == "migrate":
        applied = await apply_migrations(await _database(settings))
        log.info("migrations_done", applied=applied)
        return EXIT_OK
    if args.command == "sync":
        return await sync_command(settings, args.service, args.user, stops)
    if args.command == "status":
        return await status_command(settings, args.json, args.limit)
    if args.command == "run":
        from worker.daemon import run_daemon  # the scheduler and HTTP server: for this command only

        with stops.graceful(settings.shutdown_grace) as shutdown:
            return await run_daemon(settings, shutdown)
    if args.command == "demo":
        from convsync_tools.demo import run_demo  # tooling, imported for this command only

        code: int = await run_demo(settings, args.users, stops)
        return code
    raise ConfigError(f"unknown command {args.command}")


async def _database(settings: Settings) -> str:
    """The database URL, checked by connecting once (wrong credentials are exit 2)."""
    dsn = settings.require_database()
    try:
        conn = await asyncpg.connect(dsn, timeout=10)
    except LOGIN_REFUSED_ERRORS as error:
        raise ConfigError(f"DATABASE_URL was refused: {type(error).__name__}") from None
    except asyncpg.ClientConfigurationError as error:
        raise ConfigError(f"DATABASE_URL is not usable: {redact(str(error))}") from None
    except ValueError:  # asyncpg's parse of it; its message may quote any part of the URL
        raise ConfigError("DATABASE_URL is not usable: asyncpg cannot parse it") from None
    except (OSError, TimeoutError, asyncpg.PostgresError) as error:
        raise DatabaseUnreachable(
            f"cannot reach the database in DATABASE_URL: {type(error).__name__}"
        ) from None
    await conn.close()
    return dsn


async def _require_migrated(conn: asyncpg.Connection) -> None:
    """ConfigError (exit 2) naming the first migration the database still lacks, if any."""
    missing = await pending_migrations(conn)
    if missing:
        raise ConfigError(f"the database is not migrated ({missing[0]}...): run convsync migrate")


async def sync_command(
    settings: Settings,
    services: Sequence[str],
    users: Sequence[str],
    stops: signals.StopSignals | None = None,
) -> int:
    """One pass over the scope; exit 0 all synced, 1 some failed or interrupted, 2 fatal.

    A stop while connecting or checking the schema cancels at once; during the pass, in-flight
    pages get CONVSYNC_SHUTDOWN_GRACE to commit and the pass is recorded interrupted. On a
    terminal, a live progress line (``worker.progress``) shows how far it is."""
    stops = stops or signals.StopSignals()
    scope = Scope(
        services=parse_sids(",".join(services), SERVICE_SID, "--service") or settings.services,
        users=parse_sids(",".join(users), USER_SID, "--user"),
    )
    settings.require_credentials()
    dsn = await _database(settings)
    store = await Store.connect(dsn, settings.db_pool_size)
    try:
        async with store.pool.acquire() as conn:
            await _require_migrated(conn)
        with stops.graceful(settings.shutdown_grace) as shutdown:
            async with TwilioClient(settings, stop=shutdown.stop) as client:
                sync = SyncPass(settings, store, client, scope, shutdown=shutdown)
                async with progress.shown(
                    store, client.limiter, lambda: sync.state.run_id, sys.stderr
                ):
                    summary = await sync.run()
        if shutdown.stop.is_set() or summary is None:
            return EXIT_PARTIAL
        return EXIT_OK if summary.status == "succeeded" else EXIT_PARTIAL
    finally:
        await close_store(store, at_once=stops.cancelled)


async def status_command(settings: Settings, as_json: bool, limit: int) -> int:
    # The re-list queue's module brings the webhook receiver's HTTP server: for this command only.
    from worker.targets import pending_relists

    dsn = await _database(settings)
    conn = await asyncpg.connect(dsn)
    try:
        await _require_migrated(conn)
        passes = await recent_passes(conn, limit)
        users = await troubled_users(conn)
        relists = await pending_relists(conn)
    finally:
        await conn.close()
    # Errors were redacted when stored; scrubbed again with today's secrets all the same.
    passes, users = scrub(passes), scrub(users)
    if as_json:
        print(
            json.dumps(
                {"passes": passes, "users": users, "relists": relists},
                default=_json_default,
                indent=2,
            )
        )
        return EXIT_OK
    print(
        _table(
            passes,
            [
                "run_id",
                "status",
                "started_at",
                "seconds",
                "users_synced",
                "users_failed",
                "users_gone",
                "pages",
                "rows_inserted",
                "rows_updated",
                "rows_removed",
                "rows_quarantined",
            ],
        )
    )
    if users:
        print()
        print(
            _table(users, ["chat_service_sid", "user_sid", "state", "listing_pages", "last_error"])
        )
    if relists["pending"]:
        oldest = relists["oldest"]
        print()
        print(
            f"targeted re-lists pending (webhooks): {relists['pending']}, "
            f"{relists['in_progress']} in progress, oldest requested "
            f"{oldest.strftime('%Y-%m-%d %H:%M:%S') if oldest else '-'}"
        )
    return EXIT_OK


def _count(text: str) -> int:
    """An argument that counts something: a whole number, 0 or more."""
    if not (text.isascii() and text.isdigit()):
        raise argparse.ArgumentTypeError(f"expected a whole number, 0 or more, got {text!r}")
    return int(text)


def _json_default(value: Any) -> str:
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)


# C0 and C1 controls and DEL, shown escaped: a stored error may quote what upstream sent, and
# a terminal would act on them (clear the screen, retitle the window, fake a line). So are the
# line and paragraph separators and the bidirectional controls, which fake a line or reorder
# what the table shows (text that reads one way and is another).
_CONTROLS = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0))} | {
    c: f"\\u{c:04x}"
    for c in (0x061C, 0x200E, 0x200F, *range(0x2028, 0x202F), *range(0x2066, 0x206A))
}


def _table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    def cell(value: Any) -> str:
        if isinstance(value, datetime):
            return value.strftime("%Y-%m-%d %H:%M:%S")
        if isinstance(value, float):
            return f"{value:.1f}"
        return "" if value is None else str(value).translate(_CONTROLS)[:60]

    body = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c), *(len(b[i]) for b in body)]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(b, widths, strict=True)) for b in body]
    return "\n".join(lines) if body else "(no passes yet)"
