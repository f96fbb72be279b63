"""Crash safety: the update runs in a real process that SIGKILLs itself right after each
journaled step (SHARE_FAULT_AFTER); a re-run resumes it, and the chain ends consistent and
complete every time. Also the interleaving case: a crashed update whose parent moved on is
discarded and redone on the new HEAD, never published on the stale parent."""

import json

from pipelines import lineage, register
from pipelines.journal import DISCARDED, STEPS, Journal
from share_core import state as st

from .chains import MODEL, crash_after, killed_at, rerun


def assert_consistent(chain, processed: list[str]) -> None:
    """One version per processed landing, chained, nothing lost, every system agreeing."""
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
    assert (
        json.loads(lineage._dvc_cli(ws.root, "status", "-c", "--json") or "{}") == {}
    )  # the remote holds every version
    by_task = {lnd.task: lnd for lnd in storage.list_landings()}
    for v, name in zip(versions, processed):
        assert ws.seen(by_task[name].key, by_task[name].etag)["status"] == "processed"
        assert storage.status_of(by_task[name])["version"] == v
    with get_client(sync_client=True) as client:
        assert not [r for r in client.read_flow_runs() if r.state and r.state.is_running()]
    assert not [p for p in ws.journals.glob("*.json") if json.loads(p.read_text())["status"] == "open"]


# after each step is journaled; and between the act and its journal entry, where the re-run must
# find the effect in the real system (the step's check) instead of acting again
ACTED = ("build", "model_version", "mark")


def test_every_kill_point_recovers(chain, monkeypatch):
    import flows.continual as fc

    acted, execute = [], fc._execute
    monkeypatch.setattr(fc, "_execute", lambda step, u: acted.append(step.name) or execute(step, u))
    processed = []
    for point, name in zip(STEPS + tuple(f"acted:{s}" for s in ACTED), chain["names"], strict=True):
        key = crash_after(chain, name, point)
        acted.clear()
        out = rerun(chain, key)
        processed.append(name)
        assert out["status"] == "processed", (point, out)
        if point.startswith("acted:"):
            assert point.split(":")[1] not in acted, f"{point}: acted again instead of finding its effect"
        assert_consistent(chain, processed)
        assert rerun(chain, key)["status"] == "duplicate"  # and once done, exactly once


def test_a_crashed_update_whose_parent_moved_is_redone_on_the_new_head(chain):
    from flows.continual import recover_updates

    names = chain["names"]
    a = crash_after(chain, names[0], "build")  # v0001 planned, built, never published
    b = chain["storage"].upload_task(chain["src"] / names[1], "adapter", names[1])
    assert rerun(chain, b)["version"] == "v0002"  # the crashed update's id is not handed out again
    ws = chain["ws"]
    # what `share serve` does when it starts: the stale update is discarded, and its landing is
    # offered to be processed afresh (serve announces it again)
    assert recover_updates(str(ws.root), MODEL) == [{"key": a, "etag": chain["storage"].landing(a).etag}]
    assert not ws.version_dir("v0001").exists()
    out = rerun(chain, a)  # processed afresh on the new HEAD
    assert out["version"] == "v0003"
    assert st.load(ws.version_dir("v0003")).task_names == [names[1], names[0]]
    assert [r["version"] for r in register.list_versions(register.Registry(ws, MODEL))] == ["v0002", "v0003"]
    journals = [json.loads(p.read_text()) for p in ws.journals.glob("*.json")]
    assert any(h["status"] == "discarded" and h["version"] == "v0001" for j in journals for h in j["history"])
    # an update whose parent is still HEAD is offered for resuming, and resumes
    c = crash_after(chain, names[2], "evaluate")
    landing = chain["storage"].landing(c)
    assert recover_updates(str(ws.root), MODEL) == [{"key": c, "etag": landing.etag}]
    assert rerun(chain, c)["version"] == "v0004"


def test_a_rollback_killed_after_moving_the_champion_is_closed_by_the_next_one(chain):
    """A rollback is journaled step by step too: killed after the champion moved (HEAD not yet),
    the next rollback closes its journal, and champion and HEAD end where the last one asked."""
    from mlflow import MlflowClient

    from flows.continual import rollback

    ws = chain["ws"]
    for name in chain["names"][:3]:
        key = chain["storage"].upload_task(chain["src"] / name, "adapter", name)
        assert rerun(chain, key)["status"] == "processed"
    reg = register.Registry(ws, MODEL)
    killed_at(chain, "champion", "rollback", version="v0001", reason="test")
    assert register.champion_is(reg, "v0001") and ws.head() == "v0003"  # killed between the two moves
    [open_rollback] = Journal.open_journals(ws, rollbacks=True)
    assert open_rollback.done("run") and not open_rollback.done("head")
    out = rollback(str(ws.root), "v0002", model_name=MODEL, reason="test")
    assert out["champion"] == "v0002" and out["previous"] == "v0001" and out["verified"]
    assert register.champion_is(reg, "v0002") and ws.head() == "v0002"
    assert (
        Journal.open_journals(ws, rollbacks=True) == []
        and Journal.find(ws, open_rollback.provenance).status == DISCARDED
    )
    c = MlflowClient(ws.tracking_uri)
    runs = c.search_runs([c.get_experiment_by_name(MODEL).experiment_id], "tags.`share.event` = 'rollback'")
    assert sorted(r.info.status for r in runs) == ["FINISHED", "FINISHED"]  # the killed one's and the new one's


def test_a_crashed_batch_absorb_resumes_with_the_landings_it_recorded(chain):
    from flows.continual import batch_absorb

    ws, storage, names = chain["ws"], chain["storage"], chain["names"][:4]
    for n in names[:3]:
        storage.upload_task(chain["src"] / n, "adapter", n)
    killed_at(chain, "build", "batch")
    # a fourth adapter lands before the resume: the resumed batch is exactly the three it recorded
    late = storage.upload_task(chain["src"] / names[3], "adapter", names[3])
    out = batch_absorb(storage_url=storage.describe(), workspace=str(ws.root), model_name=MODEL, tolerance=1.0)
    assert out["resumed"] and out["version"] == "v0001" and len(out["absorbed"]) == 3
    assert ws.version_ids() == ["v0001"] and ws.head() == "v0001"
    assert st.load(ws.version_dir("v0001")).task_names == names[:3]
    assert [r["version"] for r in register.list_versions(register.Registry(ws, MODEL))] == ["v0001"]
    for lnd in storage.list_landings():
        if lnd.key != late:
            assert ws.seen(lnd.key, lnd.etag)["status"] == "processed" and storage.status_of(lnd)["version"] == "v0001"
    assert not [p for p in ws.journals.glob("*.json") if json.loads(p.read_text())["status"] == "open"]
    # the late landing is the next batch, on top of the resumed version
    nxt = batch_absorb(storage_url=storage.describe(), workspace=str(ws.root), model_name=MODEL, tolerance=1.0)
    assert nxt["version"] == "v0002" and len(nxt["absorbed"]) == 1
    assert st.load(ws.version_dir("v0002")).task_names == names
    assert (
        batch_absorb(storage_url=storage.describe(), workspace=str(ws.root), model_name=MODEL)["status"]
        == "nothing-to-absorb"
    )
