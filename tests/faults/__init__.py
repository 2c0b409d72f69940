"""Fault injection, for real: SIGKILL trials, PostgreSQL sessions terminated and the server
restarted, Twilio misbehaving (429/5xx/drops/truncation/timeouts/outages/expired tokens/users
deleted), schema-breaking pages, bad configuration, and a secrets scan of every output line.

Only Twilio is simulated (``convsync_tools.simulator``, with ``Simulator.corrupt_next`` for bad
input); PostgreSQL is always real. ``CONVSYNC_TRIALS=100`` runs more SIGKILL trials (default
20); ``CONVSYNC_TRIAL_SEED`` replays a sequence. What was injected and checked is summed into
``$CONVSYNC_FAULT_FIGURES`` (default /tmp/convsync-fault-figures.json) and printed at the end.
"""
