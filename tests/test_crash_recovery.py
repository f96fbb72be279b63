"""Crash safety, part 1: the update runs in a real process that SIGKILLs itself right after each
journaled step up to the model version (SHARE_FAULT_AFTER); a re-run resumes it, and the chain
ends consistent and complete every time. Also the interleaving case: a crashed update whose
parent moved on is discarded and redone on the new HEAD, never published on the stale parent.
Part 2 (the steps after, the points between an act and its journal entry, rollback and batch
absorb) is tests/test_crash_publish.py: two files, so that two test workers share the kill points."""

import json

from pipelines import register
from pipelines.journal import STEPS
from share_core import state as st

from .chains import MODEL, crash_after, recover_at_every, rerun


def test_every_kill_point_up_to_the_model_version_recovers(chain, monkeypatch):
    recover_at_every(chain, monkeypatch, STEPS[: STEPS.index("model_version") + 1])


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
