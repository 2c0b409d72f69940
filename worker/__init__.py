"""convsync: a resumable, typed sync of Twilio Conversations into PostgreSQL (the runtime).

The modules in the order data flows through a pass:

- ``config``: the environment -> one validated ``Settings``; ``errors``: every failure;
- ``sids``: the SID patterns; ``retry``: the one retry helper (HTTP and database);
- ``client`` (with ``limiter``): HTTP to Twilio, bounded, retried, under an adaptive limit;
- ``model``: a page's JSON -> typed rows and quarantined items;
- ``store`` (with ``migrate`` and the top-level ``migrations/``): every SQL statement;
  ``database``: which database errors are passing, and ``RetryingStore``, which waits them out;
  ``writer``: pages of many users committed a batch per statement;
- ``listing``: the one listing walker and its failure policy; ``leases``: the claims held;
- ``sync``: one pass (discovery, claims, listings, the outcome);
- ``daemon``: ``convsync run`` (schedule, probes, ``/metrics``); ``cli``: every command.

Beside them: ``shutdown`` (the one path from a stop to exit) and ``signals``, ``logs``
(structlog, redaction), ``metrics`` (prometheus_client), ``progress`` (the live line on a
terminal), ``loop`` (the event loop) and ``healthcheck`` (the image's). With webhooks on,
``webhooks`` (the receiver) -> ``targets`` (their durable queue) -> ``relist`` (re-lists
between passes). The developer tooling (simulator, embedded PostgreSQL, demo) is the
``convsync_tools`` package, which nothing here imports (``worker/ruff.toml``).
"""
