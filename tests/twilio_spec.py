"""Twilio's OpenAPI spec for Conversations v1 (../shared/twilio-oai), for tests to check against."""

from __future__ import annotations

import json
import os
from functools import cache
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
SPEC_PATH = Path(
    os.environ.get(
        "CONVSYNC_TWILIO_OAI",
        REPO.parent / "shared" / "twilio-oai" / "twilio_conversations_v1.json",
    )
)
USER_CONVERSATION = "conversations.v1.service.service_user.service_user_conversation"


@cache
def spec() -> dict[str, Any]:
    """The parsed spec. Absent: the calling test is skipped with the reason, except in CI,
    where a missing source of truth must fail rather than pass unchecked."""
    if not SPEC_PATH.is_file():
        message = f"Twilio OpenAPI spec not found at {SPEC_PATH} (set CONVSYNC_TWILIO_OAI)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    loaded: dict[str, Any] = json.loads(SPEC_PATH.read_text(encoding="utf-8"))
    return loaded


def schema(name: str) -> dict[str, Any]:
    found: dict[str, Any] = spec()["components"]["schemas"][name]
    return found


def resolve(node: dict[str, Any]) -> dict[str, Any]:
    """Follow a local ``$ref``."""
    ref = node.get("$ref")
    if ref is None:
        return node
    return schema(ref.rsplit("/", 1)[-1])
