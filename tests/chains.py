"""A chain of adapter landings on the tiny model, and updates that die at a named point: the
shared fixture of the crash and service tests. One process imports the flows once (~10 s of
torch, Prefect, MLflow) and forks a fresh child per crash, so every crash is a real process
death (SIGKILL) without paying the imports again each time."""

import json
import os
import select
import shutil
import subprocess
import sys
import tempfile

import pytest

from pipelines import lineage, register
from pipelines.journal import STEPS
from pipelines.params import edit_params
from pipelines.storage import LocalStorage, open_storage
from pipelines.workspace import Workspace
from share_core import state as st
from share_core.base import BaseSpec, load_base
from share_core.synthetic import shared_subspace_adapters, write_landing
from share_core.tasks import generate_tasks

BASE_ID = "tiny-minilm"
MODEL = "share-crash"
FORKER = """
import json, os, sys
from flows.continual import batch_absorb, continual_update, rollback
FLOWS = {"update": continual_update, "batch": batch_absorb, "rollback": rollback}
for line in sys.stdin:
    req = json.loads(line)
    pid = os.fork()
    if pid == 0:
        os.environ["SHARE_FAULT_AFTER"] = req.pop("fault")
        flow = FLOWS[req.pop("flow")]
        try:
            flow(**req)
        finally:
            os._exit(1)  # the fault point never came
    _, status = os.waitpid(pid, 0)
    print(-os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status), flush=True)
"""


@pytest.fixture(scope="session")
def forker(prefect_harness):
    """The forking process (one per test session: its imports are paid once) and its log."""
    from prefect.settings import PREFECT_API_URL

    # killed holders would keep the chain's Prefect lease for a minute each: the local lock alone here
    # (tests/test_lock.py covers the global one)
    env = {
        **os.environ,
        "PREFECT_API_URL": PREFECT_API_URL.value(),
        "PREFECT_LOGGING_LEVEL": "WARNING",
        "SHARE_CHAIN_LOCK": "local",
    }
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", FORKER],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        )
        yield proc, log
        proc.stdin.close()
        proc.wait(timeout=60)


@pytest.fixture
def chain(tmp_path, tiny_model_dir, forker, monkeypatch):
    ws = Workspace(tmp_path / "ws")
    lineage.init_workspace(ws.root, remote=str(tmp_path / "remote"))
    edit_params(ws.params_path, base={"model_id": BASE_ID, "model_path": str(tiny_model_dir)})
    template = generate_tasks(tmp_path / "template", names=["sentiment"], n_train=4, n_eval=16)[0]
    base = BaseSpec(model_id=BASE_ID, model_path=str(tiny_model_dir))
    model, _ = load_base(base)
    names = [f"t{i:02d}" for i in range(len(STEPS) + 3)]
    for a in shared_subspace_adapters(
        model, names, 2, targets=base.targets(), heads=base.heads(), base_model_id=BASE_ID, rank=2, dim=4
    ):
        write_landing(tmp_path / "src", a, template)
    monkeypatch.setenv("SHARE_CHAIN_LOCK", "local")  # in this process too (the re-runs)
    proc, log = forker
    return {
        "ws": ws,
        "storage": LocalStorage(tmp_path / "bucket"),
        "src": tmp_path / "src",
        "names": names,
        "forker": proc,
        "log": log,
    }


def killed_at(chain, step: str, flow: str, **extra) -> None:
    """Run `flow` in a forked child that must die (SIGKILL) right after `step`."""
    forker, log = chain["forker"], chain["log"]
    params = {"workspace": str(chain["ws"].root), "model_name": MODEL}
    if flow != "rollback":
        params.update(storage_url=chain["storage"].describe(), tolerance=1.0)
    forker.stdin.write(json.dumps({"fault": step, "flow": flow, **params, **extra}) + "\n")
    forker.stdin.flush()
    ready, _, _ = select.select([forker.stdout], [], [], 300)  # bounded: a hung update fails the test
    code = forker.stdout.readline().strip() if ready else "(none after 300 s)"
    log.seek(0)
    assert code == "-9", f"{step}: exit {code or 'of the forker'}\n{log.read()[-3000:]}"
    log.seek(0, os.SEEK_END)


def crash_after(chain, name: str, step: str) -> str:
    """Land `name` and run its update in a process that dies right after `step`."""
    key = chain["storage"].upload_task(chain["src"] / name, "adapter", name)
    killed_at(chain, step, "update", key=key)
    return key


def rerun(chain, key: str) -> dict:
    from flows.continual import continual_update

    return continual_update(
        key=key,
        storage_url=chain["storage"].describe(),
        workspace=str(chain["ws"].root),
        model_name=MODEL,
        tolerance=1.0,
    )


def land(ws: Workspace, url: str, task_dir, kind: str, model_name: str) -> dict:
    """Upload a task directory as a landing and run its update in this process."""
    from flows.continual import continual_update

    key = open_storage(url).upload_task(task_dir, kind, task_dir.name)
    return continual_update(key=key, storage_url=url, workspace=str(ws.root), model_name=model_name, tolerance=1.0)


def land_causal_chain(ws: Workspace, url: str, dirs: list, adapter, model_name: str) -> list[dict]:
    """The causal-LM chain of the family tests: the first two tasks land as datasets, the third as
    the PEFT CAUSAL_LM `adapter` trained elsewhere (with its task.yaml and eval rows). Returns the
    three outcomes."""
    from share_core.peft_io import write_adapter

    adapter.task_type = "CAUSAL_LM"
    adapter_dir = write_adapter(ws.root.parent / "adapters" / dirs[2].name, adapter)
    for f in ("task.yaml", "eval.jsonl"):
        shutil.copy(dirs[2] / f, adapter_dir / f)
    return [
        land(ws, url, task_dir, kind, model_name)
        for task_dir, kind in ((dirs[0], "dataset"), (dirs[1], "dataset"), (adapter_dir, "adapter"))
    ]


def assert_consistent(chain, processed: list[str], remote: bool = True) -> None:
    """One version per processed landing, chained, nothing lost, every system agreeing (the DVC
    remote too, unless `remote` is False: a `dvc status -c` costs ~1.5 s CPU)."""
    from mlflow import MlflowClient
    from prefect.client.orchestration import get_client

    ws, storage = chain["ws"], chain["storage"]
    versions = ws.version_ids()
    assert versions == [f"v{i:04d}" for i in range(1, len(processed) + 1)] and ws.head() == versions[-1]
    for parent, child in zip(versions, versions[1:]):
        pm, cm = st.read_manifest(ws.version_dir(parent)), st.read_manifest(ws.version_dir(child))
        assert cm.parent == parent and cm.task_names[: len(pm.tasks)] == pm.task_names
    assert st.load(ws.version_dir(versions[-1])).task_names == processed  # every task learned is there
    registered = register.list_versions(register.Registry(ws, MODEL))
    assert [r["version"] for r in registered] == versions  # one model version each, no duplicate
    c = MlflowClient(ws.tracking_uri)
    exp = c.get_experiment_by_name(MODEL)
    assert not [r for r in c.search_runs([exp.experiment_id]) if r.info.status == "RUNNING"]
    if remote:  # the remote holds every version and landing
        assert json.loads(lineage._dvc_cli(ws.root, "status", "-c", "--json") or "{}") == {}
    by_task = {lnd.task: lnd for lnd in storage.list_landings()}
    for v, name in zip(versions, processed):
        assert ws.seen(by_task[name].key, by_task[name].etag)["status"] == "processed"
        assert storage.status_of(by_task[name])["version"] == v
    with get_client(sync_client=True) as client:
        assert not [r for r in client.read_flow_runs() if r.state and r.state.is_running()]
    assert not [p for p in ws.journals.glob("*.json") if json.loads(p.read_text())["status"] == "open"]


def recover_at_every(chain, monkeypatch, points) -> None:
    """Land one adapter per kill point, killed there ("<step>": after it is journaled;
    "acted:<step>": between its act and its journal entry, where the re-run must find the effect
    in the real system instead of acting again), re-run each to completion and check the chain
    after every one; a third run is a duplicate."""
    import flows.continual as fc

    acted, execute = [], fc._execute
    monkeypatch.setattr(fc, "_execute", lambda step, u: acted.append(step.name) or execute(step, u))
    processed = []
    assert len(points) <= len(chain["names"]), "one landing per kill point"
    for point, name in zip(points, chain["names"]):
        key = crash_after(chain, name, point)
        acted.clear()
        out = rerun(chain, key)
        processed.append(name)
        assert out["status"] == "processed", (point, out)
        if point.startswith("acted:"):
            assert point.split(":")[1] not in acted, f"{point}: acted again instead of finding its effect"
        # the remote once, at the end: a landing pushes only its own stage file, so a version a kill
        # left unpushed stays missing there
        assert_consistent(chain, processed, remote=point == points[-1])
        assert rerun(chain, key)["status"] == "duplicate"  # and once done, exactly once
