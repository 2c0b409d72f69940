"""dlt's ``rest_api`` source: services -> users -> conversations (parallelized), merged into
PostgreSQL (dataset ``dlt_bench``), in a child process: ``python -m bench.dlt_run URL ...``.

The child prints one JSON line: the pipeline's seconds (and per step) and rows loaded, or
``{"skipped": reason}`` when dlt cannot be imported. Extraction runs ``workers`` threads with
as many items in parallel, matching convsync's concurrency.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

from bench.pg import with_password
from bench.sim import REPO, SimProcess, count


@dataclass
class DltRun:
    """One dlt pipeline run (or why it was skipped)."""

    skipped: str | None = None
    seconds: float = 0.0
    steps: dict[str, float] = field(default_factory=dict)
    pages: int = 0
    rows: dict[str, int] = field(default_factory=dict)
    peak_rss_mb: float = 0.0
    workers: int = 0
    dlt_version: str = ""

    @property
    def pages_per_second(self) -> float:
        return self.pages / self.seconds if self.seconds else 0.0

    def to_json(self) -> dict[str, Any]:
        return {**self.__dict__, "pages_per_second": self.pages_per_second}


def source_config(base_url: str, account_sid: str, auth_token: str) -> dict[str, Any]:
    """The rest_api source: the same three listings convsync walks, followed by next_page_url."""
    return {
        "client": {
            "base_url": f"{base_url}/v1/",
            "auth": {"type": "http_basic", "username": account_sid, "password": auth_token},
            "paginator": {"type": "json_link", "next_url_path": "meta.next_page_url"},
        },
        "resource_defaults": {
            "write_disposition": "merge",
            "endpoint": {"params": {"PageSize": 50}},
        },
        "resources": [
            {
                "name": "services",
                "endpoint": {"path": "Services", "data_selector": "services"},
                "primary_key": "sid",
            },
            {
                "name": "users",
                "endpoint": {
                    "path": "Services/{resources.services.sid}/Users",
                    "data_selector": "users",
                },
                "primary_key": ["chat_service_sid", "sid"],
            },
            {
                "name": "user_conversations",
                "endpoint": {
                    "path": "Services/{resources.users.chat_service_sid}/Users/"
                    "{resources.users.sid}/Conversations",
                    "data_selector": "conversations",
                },
                "primary_key": ["chat_service_sid", "user_sid", "conversation_sid"],
                "parallelized": True,
            },
        ],
    }


def _child(base_url: str, account_sid: str, auth_token: str, db_url: str, workdir: str) -> None:
    """Run the pipeline in this process; print the result as one JSON line."""
    try:
        import dlt
        from dlt.sources.rest_api import rest_api_source
    except ImportError as error:
        print(json.dumps({"skipped": f"dlt cannot be imported: {error}"}))
        return
    source = rest_api_source(source_config(base_url, account_sid, auth_token))  # type: ignore[arg-type]
    pipeline = dlt.pipeline(
        pipeline_name="convsync_bench",
        destination=dlt.destinations.postgres(with_password(db_url)),
        dataset_name="dlt_bench",
        pipelines_dir=workdir,
    )
    started = time.perf_counter()
    pipeline.run(source)
    seconds = time.perf_counter() - started
    trace = pipeline.last_trace
    assert trace is not None
    steps = {
        step.step: (step.finished_at - step.started_at).total_seconds()
        for step in trace.steps
        if step.finished_at is not None
    }
    normalized = trace.last_normalize_info
    rows = dict(normalized.row_counts) if normalized is not None else {}
    rss_kb = max(
        resource.getrusage(who).ru_maxrss
        for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
    )
    print(json.dumps({"seconds": seconds, "steps": steps, "rows": rows,
                      "peak_rss_mb": rss_kb / 1024, "dlt_version": dlt.__version__}))  # fmt: skip


def run_dlt(sim: SimProcess, db_url: str, workers: int, timeout: float = 1200) -> DltRun:
    """The pipeline in a child process against ``sim``, extracting with ``workers`` threads."""
    with tempfile.TemporaryDirectory(prefix="convsync-bench-dlt-") as workdir:
        env = {
            **os.environ,
            "RUNTIME__DLTHUB_TELEMETRY": "false",
            "EXTRACT__WORKERS": str(workers),
            "EXTRACT__MAX_PARALLEL_ITEMS": str(workers),
        }
        sim.reset_stats()
        proc = subprocess.Popen(
            [sys.executable, "-m", "bench.dlt_run", sim.url, sim.account_sid, sim.auth_token,
             db_url, workdir],
            cwd=workdir,  # dlt looks for .dlt/ config in the working directory: none there
            env={**env, "PYTHONPATH": str(REPO)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )  # fmt: skip
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            return DltRun(skipped=f"timed out after {timeout:.0f}s", workers=workers)
        lines = out.decode(errors="replace").strip().splitlines()
        if proc.returncode != 0 or not lines:
            tail = err.decode(errors="replace").strip().splitlines()[-3:]
            return DltRun(skipped=f"dlt failed (exit {proc.returncode}): {' | '.join(tail)}")
        result = json.loads(lines[-1])
        if "skipped" in result:
            return DltRun(skipped=result["skipped"])
        stats = sim.stats()
        return DltRun(
            seconds=result["seconds"],
            steps=result["steps"],
            pages=count(stats, 200),
            rows=result["rows"],
            peak_rss_mb=result["peak_rss_mb"],
            workers=workers,
            dlt_version=result["dlt_version"],
        )


if __name__ == "__main__":
    _child(*sys.argv[1:6])
