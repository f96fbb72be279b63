"""`share serve` as a service (issue 15): every landing reaches an outcome, transient Prefect API
faults are retried, chains on one Prefect server stay apart, and a dead holder's concurrency
slot is freed at once. Real Prefect server (the session harness), real SIGKILLs; no training
(adapter landings on the tiny model, or flows that do no work)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from flows.lock import LEASE_FILE, chain_id, chain_lock, limit_name, reset_stale_slots
from flows.watcher import Watcher, read_record
from pipelines.workspace import Workspace

from .chains import MODEL, killed_at, rerun
from .conftest import wait_for

PYTHON = sys.executable


def _env(**extra) -> dict:
    from prefect.settings import PREFECT_API_URL

    return {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PREFECT_LOGGING_LEVEL": "WARNING", **extra}


# ---- an outcome for every landing ----------------------------------------------------------------
def test_a_landing_killed_before_its_journal_opened_is_announced_again_until_it_has_an_outcome(chain):
    ws, storage, name = chain["ws"], chain["storage"], chain["names"][0]
    watcher = Watcher(storage, storage.describe(), ws.root / "watcher-ledger.json", chain="c1", outcome=ws.seen)
    storage.upload_task(chain["src"] / name, "adapter", name)
    [landing] = watcher.poll_once()
    # the update dies holding the chain, before it downloaded, validated or journaled anything
    killed_at(chain, "lock", "update", key=landing.key)
    assert not list(ws.journals.glob("*.json")) and ws.seen(landing.key, landing.etag) is None
    assert list(watcher.pending()) == [landing.key]  # announced, no outcome: not done
    assert watcher.poll_once() == []  # the poll alone would never take it again
    assert watcher.reconcile(60.0) == []  # not yet due
    assert watcher.reconcile(0.0, in_flight=lambda: {landing.key}) == []  # a run still queued for it
    assert [x.key for x in watcher.reconcile(0.0, in_flight=lambda: set())] == [landing.key]
    assert read_record(watcher.ledger)[landing.key]["attempts"] == 2
    assert watcher.reconcile(0.5, in_flight=lambda: set()) == []  # the 2nd attempt waits 2 × timeout
    out = rerun(chain, landing.key)  # what the re-announced event's run does
    assert out["status"] == "processed" and out["version"] == "v0001"
    assert watcher.pending() == {} and watcher.reconcile(0.0, in_flight=lambda: set()) == []
    assert rerun(chain, landing.key)["status"] == "duplicate"  # a late duplicate event is a no-op
    # a rollback killed between its MLflow run's start and end: serve's recovery (or the next rollback) ends it
    from mlflow import MlflowClient

    from flows.continual import recover_updates

    c = MlflowClient(ws.tracking_uri)
    killed = c.create_run(c.get_experiment_by_name(MODEL).experiment_id, tags={"share.event": "rollback"})
    assert recover_updates(str(ws.root), MODEL) == []
    assert c.get_run(killed.info.run_id).info.status == "FAILED"


# ---- transient faults ----------------------------------------------------------------------------
FAULTY = """
import json, sys
import httpx
from flows import lock  # sets the Prefect client's retry defaults before Prefect is imported

LIMITS = json.loads(sys.argv[2])
counts = {k: 0 for k in LIMITS}


def fault(request):
    path = request.url.path
    kind = ("create" if path.endswith("/flow_runs/") else "lease" if path.endswith("/increment-with-lease") else None)
    if request.method != "POST" or kind is None or counts[kind] >= LIMITS[kind]:
        return None
    counts[kind] += 1  # what an overloaded sqlite server answers ("database is locked"); Retry-After 0 keeps it quick
    body = {"exception_message": "Service Unavailable"}
    return httpx.Response(503, request=request, headers={"Retry-After": "0"}, json=body)


orig_async, orig_sync = httpx.AsyncClient.send, httpx.Client.send


async def asend(self, request, *a, **k):
    return fault(request) or await orig_async(self, request, *a, **k)


def ssend(self, request, *a, **k):
    return fault(request) or orig_sync(self, request, *a, **k)


httpx.AsyncClient.send, httpx.Client.send = asend, ssend
from prefect import flow

from flows.lock import chain_lock
from pipelines.workspace import Workspace


@flow
def hold(root: str) -> str:  # created and locked like every update (no model imported: seconds, not a minute)
    with chain_lock(Workspace(root)):
        return "held"


print(json.dumps({"out": hold(sys.argv[1]), "counts": counts}))
"""


def test_503s_at_flow_run_creation_and_at_the_chain_lock_are_retried(tmp_path, prefect_harness):
    # 6 × 503 at creation is one more than Prefect's default 5 retries; 12 at the lock outlast the
    # client's 7 retries as well, so the lock's own backoff has to take it again
    limits = {"create": 6, "lease": 12}
    proc = subprocess.run(
        [PYTHON, "-c", FAULTY, str(tmp_path / "ws"), json.dumps(limits)],
        env=_env(SHARE_CHAIN_LOCK="prefect", SHARE_PREFECT_RETRY_SECONDS="60"),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got == {"out": "held", "counts": limits}
    assert "transient Prefect API fault" in proc.stderr  # the lock's backoff took over


# ---- a dead holder does not block the chain --------------------------------------------------------
HOLD_AND_DIE = """
import os, signal, sys
from flows.lock import chain_lock
from pipelines.workspace import Workspace
with chain_lock(Workspace(sys.argv[1])):
    print("held", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
"""


def _die_holding(root) -> None:
    proc = subprocess.run(
        [PYTHON, "-c", HOLD_AND_DIE, str(root)],
        env=_env(SHARE_CHAIN_LOCK="prefect"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == -9 and "held" in proc.stdout, proc.stderr[-2000:]


def _active_slots(ws) -> int:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as c:
        return c.read_global_concurrency_limit_by_name(limit_name(ws)).active_slots


def test_the_slot_of_a_killed_holder_is_freed_at_once(tmp_path, prefect_harness, monkeypatch):
    monkeypatch.setenv("SHARE_CHAIN_LOCK", "prefect")
    ws = Workspace(tmp_path / "ws")
    _die_holding(ws.root)
    assert _active_slots(ws) == 1 and (ws.root / LEASE_FILE).is_file()  # the dead run still holds the slot
    t0 = time.monotonic()
    with chain_lock(ws):  # the next acquirer on this host releases the dead holder's lease first
        waited = time.monotonic() - t0
    assert waited < 10, f"waited {waited:.1f} s for a dead holder's slot (its lease is 60 s)"
    assert _active_slots(ws) == 0 and not (ws.root / LEASE_FILE).exists()
    # a slot with no holder on record (its lease lost with a Prefect server restart): serve's recovery resets it
    _die_holding(ws.root)
    (ws.root / LEASE_FILE).unlink()
    assert _active_slots(ws) == 1
    assert reset_stale_slots(ws) and _active_slots(ws) == 0
    assert not reset_stale_slots(ws)  # nothing to reset


# ---- chains are isolated ---------------------------------------------------------------------------
def test_two_chains_on_one_prefect_server_run_only_their_own_landings(tmp_path, prefect_harness):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    from flows.deployments import build_deployments, landings_in_flight
    from pipelines.storage import LocalStorage
    from share_core.tasks import generate_tasks

    chains = {}
    for name in ("a", "b"):
        ws = Workspace(tmp_path / f"ws-{name}")
        storage = LocalStorage(tmp_path / f"bucket-{name}")
        deps = build_deployments(storage.describe(), str(ws.root))
        ids = {d.flow_name: d.apply() for d in deps}
        watcher = Watcher(storage, storage.describe(), ws.root / "watcher-ledger.json", chain=chain_id(ws))
        chains[name] = {"ws": ws, "storage": storage, "update": ids["continual-update"], "watcher": watcher}
    assert chains["a"]["update"] != chains["b"]["update"]  # same flow, one deployment per chain
    [task] = generate_tasks(tmp_path / "t", names=["sentiment"], n_train=8, n_eval=8)
    for c in chains.values():  # the same task name lands in both chains
        c["storage"].upload_task(task, "dataset", "sentiment")
    [landing] = chains["a"]["watcher"].poll_once()

    def runs_of(dep_id):
        with get_client(sync_client=True) as client:
            return client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep_id])))

    wait_for("chain a's run", lambda: runs_of(chains["a"]["update"]), 60, {}, poll=0.5)
    time.sleep(3)  # the event had time to reach every trigger
    [run] = runs_of(chains["a"]["update"])
    assert run.parameters["key"] == landing.key and runs_of(chains["b"]["update"]) == []
    assert f"share-chain:{chain_id(chains['a']['ws'])}" in run.tags
    # the reconcile's view of what is queued: chain a's landing, nothing of chain b; the queued run
    # gets its landing's name
    assert landings_in_flight(chain_id(chains["a"]["ws"])) == {landing.key}
    assert landings_in_flight(chain_id(chains["b"]["ws"])) == set()
    with get_client(sync_client=True) as client:
        assert client.read_flow_run(run.id).name == "landing: dataset sentiment"
    [landing_b] = chains["b"]["watcher"].poll_once()
    wait_for("chain b's run", lambda: runs_of(chains["b"]["update"]), 60, {}, poll=0.5)
    assert len(runs_of(chains["a"]["update"])) == 1


def test_serve_recovery_ends_a_dead_serves_runs_and_frees_the_deployment_slot(tmp_path, prefect_harness):
    """What `share serve` does first when it starts: the chain's runs a SIGKILLed serve left
    Running (with their in-process subflows) end Crashed, which frees the continual-update
    deployment's slot (held for 300 s by the dead run otherwise)."""
    from prefect.client.orchestration import get_client
    from prefect.states import Pending, Running

    from flows.deployments import build_deployments, crash_dead_runs
    from pipelines.storage import LocalStorage

    ws = Workspace(tmp_path / "ws")
    storage = LocalStorage(tmp_path / "bucket")
    ids = {d.flow_name: d.apply() for d in build_deployments(storage.describe(), str(ws.root))}
    cid = chain_id(ws)
    with get_client(sync_client=True) as client:
        run = client.create_flow_run_from_deployment(ids["continual-update"], parameters={"key": "k/task.yaml"})
        for state in (Pending(), Running()):  # as a runner does: the slot is taken at Pending
            assert client.set_flow_run_state(run.id, state).status.value == "ACCEPT"
        dep = client.read_deployment(ids["continual-update"])
        limit = client.read_global_concurrency_limit_by_name(f"deployment:{dep.id}")
        # the dead run holds the deployment's only slot
        assert limit.active_slots == 1
        assert crash_dead_runs(cid, "its serve died") == [str(run.id)]
        assert client.read_flow_run(run.id).state.is_crashed()
        assert client.read_global_concurrency_limit_by_name(f"deployment:{dep.id}").active_slots == 0
    assert crash_dead_runs(cid, "again") == []


# ---- the served chain, killed: serve stays up / serve's processes all SIGKILLed ----------------------
@pytest.mark.skipif(
    os.environ.get("SHARE_SERVICE_E2E") != "1",
    reason="1–3 min with two `share serve` start-ups on a real Prefect server: SHARE_SERVICE_E2E=1 runs it",
)
def test_served_chain_reaches_an_outcome_for_every_landing_through_kills(tmp_path, tiny_model_dir):
    from pipelines import lineage
    from pipelines.params import edit_params
    from pipelines.storage import LocalStorage
    from share_core.base import BaseSpec, load_base
    from share_core.synthetic import shared_subspace_adapters, write_landing
    from share_core.tasks import generate_tasks

    from .conftest import free_port, rest
    from .test_train_pool import descendants, signal_groups, stop

    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_API_URL": api,
        "PREFECT_UI_ENABLED": "false",
        "PREFECT_RUNNER_POLL_FREQUENCY": "1",
        "NO_PROXY": "127.0.0.1,localhost",
        "SHARE_FAULT_AFTER": "lock",
        "SHARE_FAULT_ONCE": str(tmp_path / "die-once"),
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("SHARE_CHAIN_LOCK", None)  # the Prefect global limit and its lease: what a dead holder blocks
    ws = Workspace(tmp_path / "ws")
    lineage.init_workspace(ws.root, remote=str(tmp_path / "remote"))
    edit_params(ws.params_path, base={"model_id": "tiny-minilm", "model_path": str(tiny_model_dir)})
    template = generate_tasks(tmp_path / "template", names=["sentiment"], n_train=4, n_eval=16)[0]
    base = BaseSpec(model_id="tiny-minilm", model_path=str(tiny_model_dir))
    names = ["t0", "t1", "t2"]
    for a in shared_subspace_adapters(
        load_base(base)[0], names, 2, targets=base.targets(), heads=base.heads(), base_model_id="tiny-minilm"
    ):
        write_landing(tmp_path / "src", a, template)
    storage = LocalStorage(tmp_path / "bucket")
    (tmp_path / "bucket").mkdir()
    update = f"continual-update/chain-{chain_id(ws)}"
    bin_dir = os.path.dirname(PYTHON)
    procs, logs = {}, []

    def launch(name, argv):
        log = tmp_path / f"{name}.log"
        logs.append(log)
        with open(log, "w") as out:
            procs[name] = (
                subprocess.Popen(
                    argv,
                    env=env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                ),
                log,
            )
        return procs[name][0]

    serve_argv = [f"{bin_dir}/share", "serve", "--storage", storage.describe(), "-w", str(ws.root)]
    serve_argv += ["--model-name", MODEL, "--poll-seconds", "1", "--reconcile-seconds", "5"]

    def outcome(name):
        lnd = storage.landing(f"incoming/adapters/{name}/task.yaml")
        return lnd is not None and ws.seen(lnd.key, lnd.etag)

    server = launch("server", [f"{bin_dir}/prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)])
    try:
        wait_for("the Prefect server", lambda: rest(f"{api}/health"), 120, procs)
        serve = launch("serve1", serve_argv)
        wait_for("the chain's deployment", lambda: rest(f"{api}/deployments/name/{update}"), 120, procs, poll=1)
        # 1. serve stays up; the landing's run dies before its journal opens: reconcile takes it again
        (tmp_path / "die-once").write_text("")
        t0 = time.monotonic()
        storage.upload_task(tmp_path / "src" / "t0", "adapter", "t0")
        assert wait_for("t0's outcome", lambda: outcome("t0"), 240, procs, poll=1)["status"] == "processed"
        took_reconciled = time.monotonic() - t0
        assert not (tmp_path / "die-once").exists()  # it did die once
        # 2. serve and every process under it SIGKILLed while the next update holds the chain
        from pipelines.journal import Journal

        wait_for("t0's update to end", lambda: not Journal.open_journals(ws), 120, procs, poll=0.5)
        wait_for("the chain to be free", lambda: not (ws.root / LEASE_FILE).is_file(), 60, procs, poll=0.2)
        storage.upload_task(tmp_path / "src" / "t1", "adapter", "t1")
        wait_for("t1's update to hold the chain", lambda: (ws.root / LEASE_FILE).is_file(), 120, procs, poll=0.2)
        signal_groups([serve.pid, *descendants(serve.pid)], signal.SIGKILL)
        serve.wait(10)
        del procs["serve1"]
        t1 = time.monotonic()
        launch("serve2", serve_argv)
        assert wait_for("t1's outcome", lambda: outcome("t1"), 240, procs, poll=1)["status"] == "processed"
        took_recovered = time.monotonic() - t1
        storage.upload_task(tmp_path / "src" / "t2", "adapter", "t2")
        assert wait_for("t2's outcome", lambda: outcome("t2"), 120, procs, poll=1)["status"] == "processed"
        print(f"reconciled after a kill: {took_reconciled:.0f} s; recovered after serve died: {took_recovered:.0f} s")
        assert took_recovered < 150  # not the 300 s lease of the dead run's deployment slot
        assert ws.version_ids() == ["v0001", "v0002", "v0003"]
        wait_for("every update closed", lambda: not Journal.open_journals(ws), 60, procs, poll=0.5)
        assert [(storage.status_of(x) or {}).get("status") for x in storage.list_landings()] == ["processed"] * 3

        def none_running():
            return not [r for r in rest(f"{api}/flow_runs/filter", {}) if r["state_type"] in ("RUNNING", "PENDING")]

        wait_for("no flow run left Running or Pending", none_running, 60, procs, poll=1)
        states = {r["name"]: r["state_type"] for r in rest(f"{api}/flow_runs/filter", {})}
        assert states["v0001 ← adapter t0"] in ("CRASHED", "COMPLETED") and "RUNNING" not in states.values()
    finally:
        for name, (proc, _) in list(procs.items()):
            if name != "server":
                stop(proc)
        stop(server)
