"""Training as its own deployment on a work pool (`share serve --train-pool`), with real
processes on 127.0.0.1: `prefect server start`, a process work pool, `share serve --train-pool`
(the deployments + the storage watcher) and `prefect worker start --pool`.

A landing's training runs in the flow-run process the worker started (its pid and parent pid,
logged by train-version itself, against the worker's pid and the run's infrastructure pid), not
in `serve`'s. A worker lost mid-training (SIGKILL) leaves the landing unrecorded (neither
processed nor rejected) and no version at all; once the stranded run is marked Crashed (what
Prefect's heartbeat automation does, infra/README.md) the update fails, and a re-run of the
update on a new worker completes the landing with exactly one version, at HEAD and registered."""

import os
import re
import signal
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

from flows.lock import chain_id
from pipelines import lineage, register
from pipelines.params import edit_params
from pipelines.storage import open_storage
from pipelines.workspace import Workspace
from share_core.tasks import generate_tasks

from .conftest import free_port, rest, wait_for

POOL = "share-train-test"
MODEL = "share-pool"
STEPS = 400  # a few seconds of training: long enough to lose the worker mid-training
BIN = Path(sys.executable).parent
BUILDING = re.compile(r"building (v\d{4,}) in process (\d+) \(parent (\d+)\)")  # train_version's own log line


# ---- processes (Linux /proc) -----------------------------------------------------------------
def _stat(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def alive(pid: int) -> bool:
    st = _stat(pid)
    return st is not None and st[0] != "Z"


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit() and (st := _stat(int(p.name))):
            children.setdefault(int(st[1]), []).append(int(p.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def signal_groups(pids: list[int], sig: int) -> None:
    """Signal the process groups of `pids`: Prefect starts each flow run in its own session, so
    the group of the worker (or of `serve`) alone misses them."""
    groups = set()
    for p in pids:
        try:
            groups.add(os.getpgid(p))
        except ProcessLookupError:
            pass
    for g in groups:
        try:
            os.killpg(g, sig)
        except ProcessLookupError:
            pass


def kill_session(pid: int) -> None:
    if alive(pid):
        signal_groups([pid], signal.SIGKILL)


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM `proc` and everything below it, SIGKILL what is left after 20 s; bounded."""
    if proc.poll() is not None:
        return
    ours = [proc.pid, *descendants(proc.pid)]
    signal_groups(ours, signal.SIGTERM)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        pass
    signal_groups([p for p in ours if alive(p)] + descendants(proc.pid), signal.SIGKILL)
    proc.wait(10)


# ---- REST ------------------------------------------------------------------------------------
def test_training_runs_on_a_pool_worker_and_a_lost_worker_leaves_the_landing_retryable(tmp_path, tiny_model_dir):
    from prefect.workers.process import ProcessWorker

    t0, timings = time.monotonic(), {}
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_API_URL": api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
        "PREFECT_RUNNER_POLL_FREQUENCY": "1",
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "PREFECT_LOGGING_TO_API_BATCH_INTERVAL": "0.5",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "DVC_NO_ANALYTICS": "1",
        "OMP_WAIT_POLICY": "PASSIVE",
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
    }
    env.pop("MLFLOW_TRACKING_URI", None)  # the workspace's own sqlite store
    ws = Workspace(tmp_path / "ws")
    lineage.init_workspace(ws.root)
    edit_params(
        ws.params_path,
        base={"model_id": "tiny-minilm", "model_path": str(tiny_model_dir)},
        train={"steps": STEPS, "batch_size": 16},
    )
    (tmp_path / "bucket").mkdir()  # `share serve` watches an existing directory
    storage_url = (tmp_path / "bucket").as_uri()
    storage = open_storage(storage_url)
    task_dir = generate_tasks(tmp_path / "tasks", names=["sentiment"], n_train=32, n_eval=16)[0]
    (tmp_path / "logs").mkdir()

    with ExitStack() as stack:
        procs: dict[str, tuple[subprocess.Popen, Path]] = {}  # watched: fail early if one exits

        def launch(name: str, argv: list[str]) -> subprocess.Popen:
            log = tmp_path / "logs" / f"{name}.log"
            with open(log, "w") as out:
                proc = subprocess.Popen(
                    argv,
                    env=env,
                    cwd=tmp_path,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            stack.callback(stop, proc)
            procs[name] = (proc, log)
            return proc

        launch("server", [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)])
        wait_for("the Prefect server", lambda: rest(f"{api}/health"), 90, procs)
        # = `prefect work-pool create share-train-test --type process`, without a second CLI start-up
        rest(
            f"{api}/work_pools/",
            {"name": POOL, "type": "process", "base_job_template": ProcessWorker.get_default_base_job_template()},
        )
        serve = launch(
            "serve",
            [
                str(BIN / "share"),
                "serve",
                "--storage",
                storage_url,
                "-w",
                str(ws.root),
                "--model-name",
                MODEL,
                "--poll-seconds",
                "1",
                "--train-pool",
                POOL,
            ],
        )
        worker1 = launch("worker1", [str(BIN / "prefect"), "worker", "start", "--pool", POOL, "--name", "worker1"])
        train_dep = wait_for(
            "the train-version deployment", lambda: rest(f"{api}/deployments/name/train-version/train"), 90, procs
        )
        update_dep = wait_for(
            "the continual-update deployment",
            lambda: rest(f"{api}/deployments/name/continual-update/chain-{chain_id(ws)}"),
            90,
            procs,
        )
        assert (
            train_dep["work_pool_name"] == POOL
            and update_dep["parameters"]["train_deployment"] == "train-version/train"
        )
        assert update_dep["work_pool_name"] is None  # the update itself is served by `share serve`
        timings["up"] = time.monotonic() - t0

        def runs(dep: dict) -> list[dict]:
            return rest(
                f"{api}/flow_runs/filter",
                {"deployments": {"id": {"any_": [dep["id"]]}}, "sort": "EXPECTED_START_TIME_ASC"},
            )

        def building(run_ids: list[str]) -> list[tuple[str, int, int]]:
            """(version, pid, parent pid) of every `building …` line the runs logged."""
            logs = rest(f"{api}/logs/filter", {"logs": {"flow_run_id": {"any_": run_ids}}})
            return [
                (m.group(1), int(m.group(2)), int(m.group(3))) for e in logs if (m := BUILDING.search(e["message"]))
            ]

        def nothing_recorded() -> None:
            landing = next(lnd for lnd in storage.list_landings() if lnd.key == key)
            assert (
                ws.landing_history(key) == [] and storage.status_history(landing) == []
            )  # neither processed nor rejected
            assert ws.version_ids() == [] and ws.head() is None and not (ws.versions / "v0001").exists()
            assert register.list_versions(register.Registry(ws, MODEL)) == []

        # 1. a landing: the event starts continual-update in `serve`, which hands training to the
        #    pool; worker1 runs it in a process of its own
        key = storage.upload_task(task_dir, "dataset", "sentiment")
        run1 = wait_for(
            "a running train-version run",
            lambda: [r for r in runs(train_dep) if r["state_type"] == "RUNNING"],
            120,
            procs,
        )[0]
        ((version, pid, ppid),) = wait_for(
            "train-version to start building", lambda: building([run1["id"]]), 60, procs, poll=0.2
        )
        stack.callback(kill_session, pid)  # its own session: stopping worker1 after a failure would miss it
        assert alive(pid) and not (ws.versions / version).exists(), (
            f"the training was over before the worker could be lost: raise STEPS ({STEPS})"
        )
        assert (
            version == "v0001" and ppid == worker1.pid and _stat(pid)[1] == str(worker1.pid)
        )  # a child of the worker…
        assert pid == int(rest(f"{api}/flow_runs/{run1['id']}")["infrastructure_pid"]) and pid not in (
            os.getpid(),
            serve.pid,
        )  # …that it reported for the run
        timings["training"] = time.monotonic() - t0

        # 2. worker1 is lost mid-training. SIGKILL of its process group leaves the run going (the
        #    process worker starts each run in its own session); losing the machine kills both.
        os.killpg(worker1.pid, signal.SIGKILL)
        worker1.wait(10)
        del procs["worker1"]
        assert alive(pid) and os.getsid(pid) == pid
        os.killpg(pid, signal.SIGKILL)
        wait_for("the training process to die", lambda: not alive(pid), 10, procs, poll=0.1)
        nothing_recorded()
        worker2 = launch(
            "worker2", [str(BIN / "prefect"), "worker", "start", "--pool", POOL, "--name", "worker2"]
        )  # starts up meanwhile
        # nothing reports a killed run: it stays Running until Prefect's heartbeat automation marks it
        # Crashed (infra/README.md; minutes); the test does that at once
        time.sleep(1)
        assert rest(f"{api}/flow_runs/{run1['id']}")["state_type"] == "RUNNING"
        rest(
            f"{api}/flow_runs/{run1['id']}/set_state",
            {"state": {"type": "CRASHED", "name": "Crashed", "message": "worker lost"}, "force": True},
        )
        ended = wait_for(
            "the continual-update run to end",
            lambda: [r for r in runs(update_dep) if r["state_type"] not in ("SCHEDULED", "PENDING", "RUNNING")],
            60,
            procs,
        )
        assert [r["state_type"] for r in ended] == ["FAILED"] and "ended Crashed" in ended[0]["state"]["message"], ended
        nothing_recorded()
        timings["failed"] = time.monotonic() - t0

        # 3. a re-run of the update (= `prefect deployment run continual-update/chain-<id>
        #    --param key=…`) on the new worker completes the landing: exactly one version
        rerun = rest(f"{api}/deployments/{update_dep['id']}/create_flow_run", {"parameters": {"key": key}})
        wait_for(
            "the re-run to complete",
            lambda: rest(f"{api}/flow_runs/{rerun['id']}")["state_type"] == "COMPLETED",
            150,
            procs,
        )
        timings["re-run"] = time.monotonic() - t0
        run1_after, run2 = runs(train_dep)
        assert (run1_after["state_type"], run2["state_type"]) == ("CRASHED", "COMPLETED")
        ((version2, pid2, ppid2),) = building([run2["id"]])
        assert (
            version2 == "v0001"
            and ppid2 == worker2.pid
            and pid2 == int(run2["infrastructure_pid"])
            and pid2 not in (os.getpid(), serve.pid)
        )
        assert building([r["id"] for r in runs(update_dep)]) == []  # `serve`'s runs built nothing themselves

        assert (
            ws.version_ids() == ["v0001"]
            and sorted(p.name for p in ws.versions.iterdir() if p.name != ".gitignore") == ["v0001"]
            and ws.head() == "v0001"
        )
        landing = next(lnd for lnd in storage.list_landings() if lnd.key == key)
        assert [(r["etag"], r["status"], r["version"]) for r in ws.landing_history(key)] == [
            (landing.etag, "processed", "v0001")
        ]
        assert [(r["etag"], r["status"], r["version"]) for r in storage.status_history(landing)] == [
            (landing.etag, "processed", "v0001")
        ]
        registered = register.list_versions(register.Registry(ws, MODEL))
        assert [(r["version"], sorted(r["aliases"])) for r in registered] == [("v0001", ["candidate", "champion"])], (
            registered
        )
        assert serve.poll() is None and worker2.poll() is None
    timings["down"] = time.monotonic() - t0
    print("train-pool timings (s since start):", {k: round(v, 1) for k, v in timings.items()})
