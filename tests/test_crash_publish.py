"""Crash safety, part 2 (part 1: tests/test_crash_recovery.py): kills after each journaled step
from the aliases on and between an act and its journal entry, where the re-run must find the
effect in the real system (the step's check) instead of acting again; a rollback killed between
its moves; a batch absorb killed after its build."""

import json

from pipelines import register
from pipelines.journal import DISCARDED, STEPS, Journal
from share_core import state as st

from .chains import MODEL, killed_at, recover_at_every, rerun


def test_every_later_kill_point_and_every_act_before_its_journal_entry_recovers(chain, monkeypatch):
    later = STEPS[STEPS.index("model_version") + 1 :]
    recover_at_every(chain, monkeypatch, later + tuple(f"acted:{s}" for s in ("build", "model_version", "mark")))


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
