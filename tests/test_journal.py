"""pipelines.journal: what an update records before and after each step, and the rules a resume
reads from it — which version an update plans, when it may still finish, what its undo restores,
and that a record written by an older or newer version of the code keeps its unknown fields."""

import json
import os
import subprocess
import sys

import pytest

from pipelines.journal import DISCARDED, OPEN, PUBLISHED, STEPS, Journal, JournalRecord, journal_id, next_version
from pipelines.workspace import Workspace


@pytest.fixture
def ws(tmp_path):
    return Workspace(tmp_path / "ws")


def on_disk(j: Journal) -> dict:
    return json.loads(j.path.read_text())


def test_each_step_is_written_as_started_then_done_and_runs_once(ws):
    j = Journal.open(ws, {"key": "k", "etag": "e"}, "dataset", "v0001", None, "run-1")
    assert on_disk(j)["status"] == OPEN and on_disk(j)["flow_runs"] == ["run-1"]
    j.begin("build")
    assert on_disk(j)["started"] == "build" and not j.done("build")  # a crash here: build must run again
    j.finish("build", note="built")
    assert on_disk(j)["started"] is None and on_disk(j)["steps"]["build"]["note"] == "built"
    calls = []
    assert j.step("stage", lambda: calls.append(1) or {"x": 1})["x"] == 1
    assert j.step("stage", lambda: calls.append(1) or {"x": 2})["x"] == 1  # done: not run again
    assert calls == [1] and j.record.last_step == "stage"
    with pytest.raises(ValueError, match="unknown journal step 'deploy'"):
        j.begin("deploy")


def test_what_an_undo_restores_is_the_first_attempts_view(ws):
    j = Journal.open(ws, {"key": "k", "etag": "e"}, "adapter", "v0001", None)
    j.begin("alias", champion="3", candidate="3")
    j.begin("alias", champion="4", candidate="4")  # the resumed step sees its own earlier effect
    assert Journal.find(ws, {"key": "k", "etag": "e"}).before("alias") == {"champion": "3", "candidate": "3"}


def test_resumable_only_while_its_parent_is_head_or_after_it_moved_head(ws):
    j = Journal.open(ws, {"key": "k", "etag": "e"}, "dataset", "v0003", "v0002")
    assert j.resumable("v0002") and j.resumable("v0003")
    assert not j.resumable("v0004")  # another update published on top: stale
    j.finish("head")
    assert j.resumable("v0004")  # it published its version: only the steps after HEAD remain
    j.close(PUBLISHED)
    assert not j.resumable("v0003") and Journal.open_journals(ws) == []


def test_a_crashed_updates_version_is_never_planned_again(ws):
    ws.versions.mkdir(parents=True)
    (ws.versions / "v0001").mkdir()
    assert next_version(ws) == "v0001"  # a directory without a manifest is not a version
    (ws.versions / "v0001" / "manifest.json").write_text("{}")
    assert next_version(ws) == "v0002"
    crashed = Journal.open(ws, {"key": "a", "etag": "1"}, "dataset", "v0002", "v0001")
    assert next_version(ws) == "v0003"  # planned by an open journal
    crashed.close(DISCARDED, reason="stale")
    assert next_version(ws) == "v0002" and on_disk(crashed)["reason"] == "stale"


def test_reopening_a_landing_keeps_its_history_and_ids_depend_on_the_provenance_only(ws):
    prov = {"key": "k", "etag": "e"}
    first = Journal.open(ws, prov, "dataset", "v0001", None)
    first.close(DISCARDED, reason="parent moved")
    second = Journal.open(ws, prov, "dataset", "v0002", "v0001")
    assert second.path == first.path and journal_id(prov) == journal_id({"etag": "e", "key": "k"})
    assert on_disk(second)["history"] == [{"version": "v0001", "parent": None, "status": DISCARDED}]
    assert journal_id({"key": "k", "etag": "f"}) != journal_id(prov)


def test_unknown_fields_survive_a_rewrite_and_batches_name_their_landings(ws):
    prov = {"batch": ["a/task.yaml@1", "b/task.yaml@2"]}
    j = Journal.open(ws, prov, "adapter", "v0001", None)
    data = {**on_disk(j), "written_by": "a newer release"}
    j.path.write_text(json.dumps(data))
    j = Journal.find(ws, prov)
    j.finish("validate")
    assert on_disk(j)["written_by"] == "a newer release"
    assert j.record.key is None and j.record.batch == prov["batch"]
    assert JournalRecord.from_json(on_disk(j)).to_json() == on_disk(j)


def test_a_fault_point_kills_the_process_right_after_its_step_is_journaled(ws, tmp_path):
    """SHARE_FAULT_AFTER=<step>: the step is on disk as done, then the process dies (SIGKILL);
    with SHARE_FAULT_ONCE=<file> only the first process dies."""
    code = (
        "import sys; from pipelines.journal import Journal; from pipelines.workspace import Workspace; "
        "j = Journal.open(Workspace(sys.argv[1]), {'key': 'k', 'etag': 'e'}, 'dataset', 'v0001', None); "
        "[j.finish(s) for s in ('validate', 'ingest', 'build')]"
    )
    once = tmp_path / "once"
    once.touch()
    env = {**os.environ, "SHARE_FAULT_AFTER": "ingest", "SHARE_FAULT_ONCE": str(once)}
    first = subprocess.run([sys.executable, "-c", code, str(ws.root)], env=env, timeout=120)
    assert first.returncode == -9 and not once.exists()
    assert set(on_disk(Journal.find(ws, {"key": "k", "etag": "e"}))["steps"]) == {"validate", "ingest"}
    second = subprocess.run([sys.executable, "-c", code, str(ws.root)], env=env, timeout=120)
    assert second.returncode == 0  # the once-file is gone: no second death
    assert set(on_disk(Journal.find(ws, {"key": "k", "etag": "e"}))["steps"]) == {"validate", "ingest", "build"}
    assert STEPS.index("ingest") < STEPS.index("build")
