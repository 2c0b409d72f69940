"""convsync's developer tooling, installed beside the runtime package ``worker`` but apart from it.

- ``simdata`` and ``simulator``: a fake Twilio Conversations API over a seeded dataset (the
  independent side of the tests: it imports nothing of the worker);
- ``pgembed``: a PostgreSQL for tests, the demo and the benchmark;
- ``cookbook`` and ``demo``: the SQL cookbook's files, and ``convsync demo`` (simulator +
  PostgreSQL + one pass + a few cookbook queries);
- ``errors``: the tooling's exceptions.

The runtime imports none of it: ``worker/cli.py`` alone dispatches ``convsync simulate`` and
``convsync demo`` here, lazily. Lint rules enforce both directions (``worker/ruff.toml``,
``convsync_tools/ruff.toml``; checked by ``tests/unit/test_import_rules.py``).
"""
