"""README.md stays true to the code: configuration reference and commands."""

from __future__ import annotations

import argparse
import re

from tests.harness import REPO
from worker.cli import build_parser
from worker.config import reference_table

README = (REPO / "README.md").read_text(encoding="utf-8")


def test_configuration_reference_is_generated_from_the_code() -> None:
    block = re.search(r"<!-- config:start -->\n(.*?)\n<!-- config:end -->", README, re.S)
    assert block is not None, "README.md lost its configuration markers"
    assert block.group(1).strip() == reference_table(), (
        "README's configuration table drifted; paste worker.config.reference_table()"
    )


def test_every_command_is_documented() -> None:
    parser = build_parser()
    [subcommands] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    commands = subcommands.choices
    for command in commands:
        assert f"convsync {command}" in README, command


def test_the_two_set_up_commands_come_first() -> None:
    first_blocks = re.findall(r"```(?:sh|bash)\n(.*?)```", README, re.S)[:1]
    assert first_blocks, "README.md has no shell block"
    commands = [line for line in first_blocks[0].splitlines() if line and not line.startswith("#")]
    assert commands == ["./dev demo", "./dev test"]
    ci = (REPO / ".ci" / "run").read_text()
    assert "./dev test" in ci


def test_every_cookbook_query_is_listed() -> None:
    for path in sorted((REPO / "cookbook").glob("*.sql")):
        assert f"`cookbook/{path.name}`" in README, path.name
