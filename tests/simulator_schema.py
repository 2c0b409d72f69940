"""Validate simulator responses against Twilio's OpenAPI file (not against our own idea of it).

OpenAPI 3.0's ``nullable: true`` becomes a JSON Schema ``null`` alternative; ``$ref``s resolve into
the spec's ``components/schemas``; formats ``uri``, ``uri-map`` and ``date-time`` are really
checked (jsonschema skips them without optional packages). The spec lists no ``required``
properties, so :func:`check` also demands that every object carries exactly the spec's keys.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

from jsonschema import Draft202012Validator, FormatChecker

from tests.twilio_spec import spec

_DROPPED = frozenset({"nullable", "x-twilio", "description", "example", "examples"})
_DATE_TIME = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$")
_URI_CHARS = re.compile(r"^[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=%]+$")


def _convert(node: Any) -> Any:
    """An OpenAPI 3.0 schema object as JSON Schema (structure-aware: property names are kept)."""
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROPPED:
            continue
        if key == "properties":
            out[key] = {name: _convert(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "not"):
            out[key] = _convert(value)
        elif key in ("allOf", "anyOf", "oneOf"):
            out[key] = [_convert(sub) for sub in value]
        else:
            out[key] = value
    if node.get("nullable"):
        if "$ref" in out:
            return {"anyOf": [{"$ref": out.pop("$ref")}, {"type": "null"}], **out}
        if "type" in out:
            out["type"] = [out["type"], "null"]
        if "enum" in out:
            out["enum"] = [*out["enum"], None]
    return out


# Formats constrain only values of their type ("type" and null-ness are checked apart).


def _is_uri(value: object) -> bool:
    if not isinstance(value, str):
        return True
    if not _URI_CHARS.match(value):
        return False
    parts = urlsplit(value)
    return parts.scheme in ("http", "https") and bool(parts.netloc)


def _is_date_time(value: object) -> bool:
    if not isinstance(value, str):
        return True
    if not _DATE_TIME.match(value):
        return False
    try:
        datetime.fromisoformat(value)
    except ValueError:
        return False
    return True


def _is_uri_map(value: object) -> bool:
    if not isinstance(value, dict):
        return True
    return all(isinstance(v, str) and _is_uri(v) for v in value.values())


def format_checker() -> FormatChecker:
    checker = FormatChecker(formats=())
    checker.checks("uri")(_is_uri)
    checker.checks("date-time")(_is_date_time)
    checker.checks("uri-map")(_is_uri_map)
    return checker


def response_schema(path: str, status: str = "200") -> dict[str, Any]:
    """The JSON Schema of a GET ``path`` template's response, e.g. ``/v1/Services/{Sid}``."""
    document = spec()
    raw = document["paths"][path]["get"]["responses"][status]["content"]["application/json"]
    schemas = {name: _convert(s) for name, s in document["components"]["schemas"].items()}
    return {**_convert(raw["schema"]), "components": {"schemas": schemas}}


def _resolve(schema: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        node = schema["components"]["schemas"][node["$ref"].rsplit("/", 1)[-1]]
    return node


def _exact_keys(schema: dict[str, Any], node: dict[str, Any], value: Any, where: str) -> None:
    node = _resolve(schema, node)
    if node.get("type") in ("object", ["object", "null"]) and "properties" in node:
        if isinstance(value, dict):
            assert set(value) == set(node["properties"]), (
                f"{where}: keys {sorted(value)} != spec {sorted(node['properties'])}"
            )
            for name, sub in node["properties"].items():
                _exact_keys(schema, sub, value[name], f"{where}.{name}")
    elif "items" in node and isinstance(value, list):
        for index, item in enumerate(value):
            _exact_keys(schema, node["items"], item, f"{where}[{index}]")


def errors(path: str, body: Any) -> list[str]:
    """Every way ``body`` fails the spec's 200 response schema of GET ``path`` (a template)."""
    schema = response_schema(path)
    validator = Draft202012Validator(schema, format_checker=format_checker())
    found = [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(body)
    ]
    try:
        _exact_keys(schema, schema, body, "$")
    except AssertionError as error:
        found.append(str(error))
    return found


def check(path: str, body: Any) -> None:
    """Fail the test unless ``body`` is a valid 200 response of GET ``path`` (a template)."""
    found = errors(path, body)
    assert not found, f"{path}: " + "; ".join(found[:10])
