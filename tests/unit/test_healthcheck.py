"""The image's HEALTHCHECK: it probes /healthz only where `convsync run` runs, so a container
of any other command is healthy."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from worker.healthcheck import HEALTHZ, check, commands, convsync_command, healthz_url


@pytest.mark.parametrize(
    ("argv", "command"),
    [
        (["/opt/venv/bin/python", "/opt/venv/bin/convsync", "run"], "run"),
        (["/opt/venv/bin/python", "/opt/venv/bin/convsync", "migrate"], "migrate"),
        (["convsync", "simulate", "--port", "8099"], "simulate"),
        (["/run/podman-init", "--", "convsync", "sync", "--user", "US1"], "sync"),
        (["python", "-m", "worker", "run"], "run"),
        (["python", "-m", "worker.healthcheck"], None),
        (["/bin/sh", "-c", "sleep 1"], None),
        ([""], None),
    ],
)
def test_the_command_is_read_from_a_process_argv(argv: list[str], command: str | None) -> None:
    assert convsync_command("\0".join(argv).encode() + b"\0") == command


def test_commands_scans_every_process(tmp_path: Path) -> None:
    for pid, argv in {"1": "/run/podman-init\0--\0convsync\0run\0", "7": "sh\0"}.items():
        (tmp_path / pid).mkdir()
        (tmp_path / pid / "cmdline").write_bytes(argv.encode())
    (tmp_path / "self").mkdir()  # not a pid
    (tmp_path / "42").mkdir()  # a process gone meanwhile: no cmdline
    assert commands(tmp_path) == ["run"]


def serve_healthz(host: str) -> Iterator[int]:
    class Server(HTTPServer):
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path == HEALTHZ else 404)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = Server((host, 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


@pytest.fixture
def healthz() -> Iterator[int]:
    yield from serve_healthz("127.0.0.1")


@pytest.fixture
def healthz_on_ipv6_loopback() -> Iterator[int]:
    yield from serve_healthz("::1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.mark.parametrize("running", [[], ["migrate"], ["sync"], ["simulate"], ["status"]])
def test_any_other_command_is_healthy_without_a_probe(running: list[str]) -> None:
    status, _ = check(running, {"CONVSYNC_HTTP_PORT": str(free_port())})  # nothing listens
    assert status == 0


def test_run_is_healthy_when_healthz_answers(healthz: int) -> None:
    assert check(["run"], {"CONVSYNC_HTTP_PORT": str(healthz)})[0] == 0


def test_run_is_unhealthy_when_nothing_answers() -> None:
    status, message = check(["run"], {"CONVSYNC_HTTP_PORT": str(free_port())})
    assert status == 1
    assert message.startswith("unhealthy")


def test_the_probe_follows_the_configured_port_and_host() -> None:
    assert healthz_url({}) == "http://127.0.0.1:8080/healthz"
    assert healthz_url({"CONVSYNC_HTTP_PORT": "9000", "CONVSYNC_HTTP_HOST": "0.0.0.0"}) == (
        "http://127.0.0.1:9000/healthz"
    )
    assert healthz_url({"CONVSYNC_HTTP_HOST": "10.1.2.3"}) == "http://10.1.2.3:8080/healthz"
    assert healthz_url({"CONVSYNC_HTTP_HOST": "fd00::7"}) == "http://[fd00::7]:8080/healthz"


def test_a_server_on_every_ipv6_address_is_probed_on_its_loopback(
    healthz_on_ipv6_loopback: int,
) -> None:
    # asyncio binds "::" IPv6-only: probed on 127.0.0.1, such a server would be found dead.
    environ = {"CONVSYNC_HTTP_HOST": "::", "CONVSYNC_HTTP_PORT": str(healthz_on_ipv6_loopback)}
    assert check(["run"], environ) == (
        0,
        f"healthy: http://[::1]:{healthz_on_ipv6_loopback}/healthz answered 200",
    )
