"""Evaluation that follows the work: certified-unchanged tasks keep their scores, moved tasks
are re-scored, a full re-scoring agrees with every certificate; the same scores on a real Dask
LocalCluster as in-process; a record is a delta of the entries its version changed and reads back
whole."""

import json

import pytest

from pipelines import evaluate as ev
from pipelines.params import Params, load_params, save_params
from pipelines.update import build_version
from pipelines.workspace import Workspace
from share_core import state as st
from share_core.base import BaseSpec, load_base
from share_core.synthetic import shared_subspace_adapters, write_landing
from share_core.tasks import generate_tasks

BASE_ID = "tiny-minilm"


@pytest.fixture
def ws(tmp_path, tiny_model_dir):
    """A workspace on the tiny model and five synthetic adapter landings: t0..t3 share one
    4-dim subspace per layer; `outsider` lives in another one."""
    w = Workspace(tmp_path / "ws")
    w.root.mkdir()
    template = generate_tasks(tmp_path / "tasks", names=["sentiment"], n_train=4, n_eval=24)[0]
    base = BaseSpec(model_id=BASE_ID, model_path=str(tiny_model_dir))
    model, _ = load_base(base)
    kw = dict(targets=base.targets(), heads=base.heads(), base_model_id=BASE_ID, rank=2, dim=4)
    for a in shared_subspace_adapters(model, ["t0", "t1", "t2", "t3"], 2, seed=1, **kw) + shared_subspace_adapters(
        model, ["outsider"], 2, seed=7, **kw
    ):
        write_landing(w.landings, a, template)
    set_params(w, tiny_model_dir)
    return w


def set_params(w: Workspace, model_dir, k_max: int = 32, **evaluate) -> None:
    save_params(
        w.params_path,
        Params().replace(
            base={"model_id": BASE_ID, "model_path": str(model_dir)}, subspace={"k_max": k_max}, evaluate=evaluate
        ),
    )


def build(w: Workspace, version: str, parent: str | None, names: list[str]) -> None:
    build_version(
        [w.landings / n for n in names],
        "adapter",
        w.version_dir(version),
        w.version_dir(parent) if parent else None,
        load_params(w.params_path),
    )


def test_unchanged_tasks_are_certified_and_a_full_rescoring_agrees(ws, tiny_model_dir):
    build(ws, "v0001", None, ["t0", "t1"])
    r1 = ev.evaluate_version(ws, "v0001")
    assert r1.rescored == ["t0", "t1"] and r1.certified == []
    build(ws, "v0002", "v0001", ["t2"])  # inside the shared subspace: the merge moves no old task
    r2 = ev.evaluate_version(ws, "v0002")
    assert r2.rescored == ["t2"] and r2.certified == ["t0", "t1"]
    for t in ("t0", "t1"):
        res = r2.results[t]
        assert res["certified"] and res["scored_in"] == "v0001" and 0 < res["drift"] <= 1e-5
        assert res["score"] == r1.scores[t]
    # the audit: a full re-scoring of v0002 gives exactly the certified scores
    audit = ev.compare(r2, ev.score_tasks(ws, "v0002", r2.tasks))
    assert audit["matches"] and audit["certificates_checked"] == 2 and audit["certificates_wrong"] == []
    # the record is O(T): this version's row and the diagonal, no matrix
    assert not hasattr(r2, "matrix") and set(r2.first_scores) == {"t0", "t1", "t2"}
    assert ev.accuracy_matrix(ws, "v0002")["rows"] == [
        [r1.scores["t0"], r1.scores["t1"], None],
        [r2.scores[t] for t in ("t0", "t1", "t2")],
    ]
    assert ws.evaluations.joinpath("v0002.png").stat().st_size > 5000


def test_moved_tasks_are_rescored(ws, tiny_model_dir):
    set_params(ws, tiny_model_dir, k_max=4)
    build(ws, "v0001", None, ["t0", "t1"])
    ev.evaluate_version(ws, "v0001")
    build(ws, "v0002", "v0001", ["outsider"])  # another subspace, k capped at 4: old tasks truncated
    errors = json.loads((ws.version_dir("v0002") / "manifest.json").read_text())["extra"]["reconstruction_error"]
    assert errors["t0"] > 1e-3 and errors["t1"] > 1e-3
    r2 = ev.evaluate_version(ws, "v0002")
    assert r2.rescored == ["outsider", "t0", "t1"] and r2.certified == []


@pytest.mark.parametrize("evaluate", [{"mode": "full"}, {"margin_floor": 1e9}], ids=["mode-full", "margin-too-small"])
def test_params_can_force_rescoring(ws, tiny_model_dir, evaluate):
    build(ws, "v0001", None, ["t0", "t1"])
    ev.evaluate_version(ws, "v0001")
    build(ws, "v0002", "v0001", ["t2"])
    set_params(ws, tiny_model_dir, **evaluate)
    r2 = ev.evaluate_version(ws, "v0002")
    assert r2.rescored == ["t0", "t1", "t2"] and r2.certified == []


def test_dask_local_cluster_scores_like_in_process(ws, tiny_model_dir, prefect_harness):
    from distributed import LocalCluster

    from flows.continual import score

    build(ws, "v0001", None, ["t0", "t1", "t2", "outsider"])
    tasks = ["t0", "t1", "t2", "outsider"]
    local = ev.score_tasks(ws, "v0001", tasks)
    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None
    ) as cluster:
        set_params(ws, tiny_model_dir, workers=2, dask_address=cluster.scheduler_address)
        cfg = load_params(ws.params_path).evaluate
        remote = score(str(ws.root), "v0001", tasks, cfg)
        with cluster.get_client() as client:
            pids = set(client.run(lambda: __import__("os").getpid()).values())
    assert remote == local
    assert len(pids) == 2 and __import__("os").getpid() not in pids


def test_an_absorb_follows_the_current_params_k_policy_and_phi(ws, tiny_model_dir):
    """The k policy and φ come from params.yaml at every landing, not from the parent version."""
    build(ws, "v0001", None, ["t0", "t1"])
    assert st.load(ws.version_dir("v0001")).phi == 2
    save_params(ws.params_path, load_params(ws.params_path).replace(subspace={"k_max": 3, "phi": 1}))
    build(ws, "v0002", "v0001", ["outsider"])  # another subspace: the merge has to truncate to k = 3
    state = st.load(ws.version_dir("v0002"))
    assert {b.shape[1] for b, _ in state.bases.values()} == {3} and {a.shape[1] for _, a in state.bases.values()} == {3}
    assert state.policy.k_max == 3 and state.phi == 1


def test_a_finetuned_task_is_rescored_once_and_the_others_keep_their_certificates(ws, tiny_model_dir):
    """Share-full rewrites one task's coefficients: that task is re-scored, the untouched ones
    stay certified, and in later versions the fine-tuned task is certified like any other."""
    from share_core.model import ShareModel

    build(ws, "v0001", None, ["t0", "t1"])
    ev.evaluate_version(ws, "v0001")
    params = load_params(ws.params_path)
    share = ShareModel(load_base(params.base)[0], st.load(ws.version_dir("v0001")))
    share.begin_finetune("t0")
    errors = share.finish_task()
    share.state.parent, share.state.extra = "v0001", {"added": [], "kind": "finetune", "reconstruction_error": errors}
    st.save(share.state, ws.version_dir("v0002"))
    assert ev.plan(ws, "v0002", params.evaluate)["score"] == ["t0"]
    ev.evaluate_version(ws, "v0002")
    build(ws, "v0003", "v0002", ["t2"])  # inside the shared subspace: nothing old moves
    p = ev.plan(ws, "v0003", params.evaluate)
    assert p["score"] == ["t2"] and sorted(p["certified"]) == ["t0", "t1"]


def test_a_landing_loads_its_version_once(ws, tiny_model_dir):
    """build_version hands the model it built to this process's evaluation: evaluating the new
    version loads nothing more, and scores exactly what a fresh load of the stored version scores."""
    build(ws, "v0001", None, ["t0", "t1"])
    before = ev.loads()
    r1 = ev.evaluate_version(ws, "v0001")
    assert ev.loads() == before  # the built model, not a second load
    ev._LOADED.clear()  # another process: loads the stored version
    fresh = ev.score_tasks(ws, "v0001", ["t0", "t1"])
    assert ev.loads() == before + 1
    assert {r["task"]: (r["score"], r["margin"]) for r in fresh} == {
        t: (r1.results[t]["score"], r1.results[t]["margin"]) for t in ("t0", "t1")
    }


def test_a_record_is_a_delta_of_the_tasks_it_touched_and_reads_back_whole(ws, monkeypatch):
    monkeypatch.setattr(ev, "RECORD_SNAPSHOT_EVERY", 2)
    build(ws, "v0001", None, ["t0", "t1"])
    records = {"v0001": ev.evaluate_version(ws, "v0001")}
    for version, parent, task in (("v0002", "v0001", "t2"), ("v0003", "v0002", "t3"), ("v0004", "v0003", "outsider")):
        build(ws, version, parent, [task])
        records[version] = ev.evaluate_version(ws, version)
    raw = {v: json.loads(ws.evaluation_path(v).read_text()) for v in records}
    assert "base" not in raw["v0001"] and [raw[v]["base"]["depth"] for v in ("v0002", "v0003")] == [1, 2]
    assert sorted(raw["v0002"]["results"]) == ["t2"] and sorted(raw["v0003"]["results"]) == ["t3"]  # not t0, t1
    assert "base" not in raw["v0004"] and len(raw["v0004"]["results"]) == 5  # the third delta in a row: whole
    ev._RECORDS.clear()  # read back from the files alone: every record exactly as evaluate returned it
    assert {v: ev.read_record(ws, v) for v in records} == records
    assert records["v0003"].results["t0"]["check"] == "certified" and records["v0003"].certified == ["t0", "t1", "t2"]
    # a parent record rewritten under a delta (here: written whole) is not silently mixed in
    ws.evaluation_path("v0002").write_text(json.dumps(records["v0002"].to_json()))
    ev._RECORDS.clear()
    with pytest.raises(ValueError, match="evaluations/v0003.json is a delta on a record of v0002"):
        ev.read_record(ws, "v0003")
