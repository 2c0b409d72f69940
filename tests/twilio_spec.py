"""Twilio's OpenAPI spec for Conversations v1, vendored in ``spec/twilio-oai/``, for tests to
check against. A missing spec fails the tests that need it: the source of truth is never
skipped."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
SPEC_PATH = REPO / "spec" / "twilio-oai" / "twilio_conversations_v1.json"
USER_CONVERSATION = "conversations.v1.service.service_user.service_user_conversation"


@cache
def spec() -> dict[str, Any]:
    """The parsed spec; the calling test fails when the file is missing."""
    if not SPEC_PATH.is_file():
        pytest.fail(f"Twilio OpenAPI spec not found at {SPEC_PATH} (vendored: see its README)")
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
