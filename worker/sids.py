"""Twilio SIDs: the one place their patterns live.

The patterns are the spec's, and mean what PostgreSQL's CHECK (``~ '^IS[0-9a-fA-F]{32}$'``)
means: the whole string, no trailing newline. Python's ``$`` would accept a trailing newline,
so they are only ever applied with ``fullmatch`` (``is_sid``).
"""

from __future__ import annotations

import re

SID_PATTERNS = {
    prefix: re.compile(rf"^{prefix}[0-9a-fA-F]{{32}}$")
    for prefix in ("AC", "IS", "US", "CH", "MB", "RL", "SK")
}


def is_sid(value: str, prefix: str) -> bool:
    """True if ``value`` is a SID of that prefix exactly as the database's CHECK accepts it."""
    return SID_PATTERNS[prefix].fullmatch(value) is not None
