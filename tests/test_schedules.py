"""Cron deployments get scheduled runs on a real `prefect server start` (127.0.0.1, sqlite).

Guards the SQLAlchemy pin: with SQLAlchemy 2.1 Prefect 3.8.8's scheduler service fails every
loop with `InvalidRequestError: Can't evaluate bulk DML statement` (its bulk INSERT of flow runs
carries the `FlowRun.state` hybrid), so batch-absorb and reevaluate-champion would never run.
The deployments are the ones `share serve` applies (flows/deployments.py), with every-minute
crons; nothing executes them here, the test only reads the runs the scheduler created."""

import os
import subprocess
import sys
import time
from dataclasses import replace

from infra import stack

from .conftest import free_port, rest

BULK_DML_ERROR = "Can't evaluate bulk DML statement"
APPLY = """
import sys
from flows.deployments import build_deployments
for d in build_deployments("s3://share/tasks", sys.argv[1], absorb_cron="* * * * *", reeval_cron="* * * * *"):
    d.apply()
"""


def test_cron_deployments_get_scheduled_runs(tmp_path):
    cfg = stack.StackConfig(data_dir=tmp_path / "stack", prefect_port=free_port(), timeout=60)
    cfg.data_dir.mkdir(parents=True)
    svc = next(s for s in stack._services(cfg) if s.name == "prefect")
    svc = replace(svc, env={**svc.env, "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "true"})
    log = cfg.logfile("prefect")
    api = cfg.url(cfg.prefect_port) + "/api"
    stack._start(cfg, svc)
    try:
        stack._wait_healthy(cfg, svc)
        env = {
            **os.environ,
            "PREFECT_API_URL": api,
            "PREFECT_HOME": str(tmp_path / "client"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        }
        done = subprocess.run(
            [sys.executable, "-c", APPLY, str(tmp_path / "ws")], env=env, capture_output=True, text=True, timeout=90
        )
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]

        flows = {f["id"]: f["name"] for f in rest(f"{api}/flows/filter", {})}  # deployments are named after the chain
        deps = {flows[d["flow_id"]]: d["id"] for d in rest(f"{api}/deployments/filter", {})}
        cron = {name: deps[name] for name in ("batch-absorb", "reevaluate-champion")}
        deadline, runs = time.monotonic() + 60, {}
        while time.monotonic() < deadline:
            runs = {
                name: rest(f"{api}/flow_runs/filter", {"deployments": {"id": {"any_": [i]}}})
                for name, i in cron.items()
            }
            if all(runs.values()) or BULK_DML_ERROR in log.read_text(errors="replace"):
                break
            time.sleep(1)
        scheduler_failed = BULK_DML_ERROR in log.read_text(errors="replace")
        assert not scheduler_failed, f"Prefect's scheduler failed (SQLAlchemy 2.1?):\n{stack._tail(log, 30)}"
        counts = {name: len(r) for name, r in runs.items()}
        print("scheduled runs:", counts)
        assert all(counts.values()), f"no scheduled runs within 60 s: {counts}\n{stack._tail(log, 30)}"
        for name, rs in runs.items():
            assert {r["state_type"] for r in rs} == {"SCHEDULED"}, name
            assert all(r["deployment_id"] == cron[name] for r in rs)
        assert not [
            r for r in rest(f"{api}/flow_runs/filter", {}) if r["deployment_id"] not in cron.values()
        ]  # none for the triggered/on-demand ones
    finally:
        stack._stop(cfg, [svc])
