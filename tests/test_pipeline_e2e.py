"""The whole chain against real components: landings in S3 (a moto server on 127.0.0.1), the
Prefect flows on Prefect's test harness, MLflow on a sqlite store, DVC in a temporary git repo
with the moto bucket as its remote. Two datasets and one adapter make three versions; the same
landing again is a no-op; bad landings are rejected and touch nothing; a rollback restores a
version byte for byte, re-evaluates to its recorded metrics, and the next landing builds on it."""

import hashlib
import json
import shutil
from pathlib import Path

import boto3
import pytest

from pipelines import evaluate, lineage, register
from pipelines.params import edit_params
from pipelines.storage import open_storage
from pipelines.workspace import Workspace
from share_core import state as st
from share_core.base import BaseSpec, load_base
from share_core.peft_io import write_adapter
from share_core.taskdata import load_task
from share_core.tasks import generate_tasks
from share_core.train import TrainConfig, train_lora

MODEL = "share-e2e"
BASE_ID = "tiny-minilm"


def tree_digest(path: Path) -> dict[str, str]:
    return {
        p.relative_to(path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


def adapter_landing(tmp: Path, task_dir: Path, model_dir: Path, targets: list[str] | None = None) -> Path:
    """A LoRA trained elsewhere (plain PEFT on the same base), landed with task.yaml + eval.jsonl."""
    task = load_task(task_dir)
    base = BaseSpec(model_id=BASE_ID, model_path=str(model_dir))
    model, tok = load_base(base)
    targets = targets or base.targets()
    adapter = train_lora(
        model, tok, task, TrainConfig(steps=15, lr=1e-2, progress=False), targets, base.heads(), BASE_ID
    )
    out = write_adapter(tmp / "adapters" / f"{task.spec.name}-{'-'.join(targets)}", adapter)
    for f in ("eval.jsonl", "task.yaml"):
        shutil.copy(task_dir / f, out / f)
    return out


@pytest.fixture
def chain(tmp_path, moto_s3, prefect_harness, tiny_model_dir):
    s3 = boto3.client("s3", endpoint_url=moto_s3)
    bucket = (
        "e2e-" + hashlib.sha256(str(tmp_path).encode()).hexdigest()[:12]
    )  # moto lives for the session: one bucket per test
    s3.create_bucket(Bucket=bucket)
    ws = Workspace(tmp_path / "ws")
    lineage.init_workspace(ws.root, remote=f"s3://{bucket}/dvcstore", endpoint_url=moto_s3)
    edit_params(
        ws.params_path,
        base={"model_id": BASE_ID, "model_path": str(tiny_model_dir)},
        train={"steps": 25, "lr": 0.01, "batch_size": 16},
    )
    url = f"s3://{bucket}/landings?endpoint_url={moto_s3}"
    tasks = generate_tasks(tmp_path / "tasks", names=["sentiment", "topic", "tense", "number"], n_train=64, n_eval=32)
    return {
        "ws": ws,
        "url": url,
        "storage": open_storage(url),
        "tasks": dict(zip(["sentiment", "topic", "tense", "number"], tasks)),
        "tmp": tmp_path,
        "s3": s3,
        "bucket": bucket,
        "model_dir": tiny_model_dir,
    }


def land_and_update(
    chain, task_dir: Path, kind: str = "dataset", tolerance: float = 1.0, name: str | None = None
) -> dict:
    from flows.continual import continual_update

    key = chain["storage"].upload_task(task_dir, kind, name or task_dir.name)
    out = continual_update(
        key=key, storage_url=chain["url"], workspace=str(chain["ws"].root), model_name=MODEL, tolerance=tolerance
    )
    return {**out, "key": key}


def snapshot(chain) -> dict:
    ws = chain["ws"]
    return {
        "versions": ws.version_ids(),
        "head": ws.head(),
        "dvc.yaml": (ws.root / "dvc.yaml").read_text(),
        "stage files": sorted(p.relative_to(ws.root).as_posix() for p in (ws.root / "lineage").rglob("*")),
        "landings": sorted(p.name for p in ws.landings.iterdir()) if ws.landings.exists() else [],
        "registered": [v["model_version"] for v in register.list_versions(register.Registry(ws, MODEL))],
        "git": lineage._git(ws.root, "rev-parse", "HEAD"),
    }


def test_landings_become_registered_versions_with_lineage_and_rollback(chain, monkeypatch):
    ws, t = chain["ws"], chain["tasks"]

    # two datasets, then an adapter trained elsewhere whose absorb fails an impossible gate
    first = land_and_update(chain, t["sentiment"])
    second = land_and_update(chain, t["topic"])
    adapter = adapter_landing(chain["tmp"], t["tense"], chain["model_dir"])
    third = land_and_update(chain, adapter, kind="adapter", tolerance=-1.0, name="tense")
    assert [o["version"] for o in (first, second, third)] == ["v0001", "v0002", "v0003"]
    assert (first["promoted"], second["promoted"], third["promoted"]) == (True, True, False)
    for version, tasks in (
        ("v0001", ["sentiment"]),
        ("v0002", ["sentiment", "topic"]),
        ("v0003", ["sentiment", "topic", "tense"]),
    ):
        rec = evaluate.read_record(ws, version)
        assert rec.tasks == tasks and all(0.0 <= rec.scores[x] <= 1.0 for x in tasks)  # every past task scored
        assert (ws.evaluations / f"{version}.png").stat().st_size > 1000
    rec3 = evaluate.read_record(ws, "v0003")
    m = evaluate.accuracy_matrix(ws, "v0003")
    assert m["versions"] == ["v0001", "v0002", "v0003"] and [sum(x is not None for x in r) for r in m["rows"]] == [
        1,
        2,
        3,
    ]

    # Prefect: each run is named after what it built and leaves a markdown artifact of the version
    from prefect.artifacts import Artifact
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as pc:
        names = {r.name for r in pc.read_flow_runs(limit=200)}
    assert {"v0001 ← dataset sentiment", "v0002 ← dataset topic", "v0003 ← adapter tense"} <= names
    card = Artifact.get("share-v0003")
    assert (
        card is not None
        and "v0003 ← tense" in card.data
        and "Forgetting gate: failed" in card.data
        and "| tense |" in card.data
    )

    # registry: three model versions; candidate = newest; champion stayed behind the gate
    versions = register.list_versions(register.Registry(ws, MODEL))
    assert [v["version"] for v in versions] == ["v0001", "v0002", "v0003"]
    aliases = {v["version"]: v["aliases"] for v in versions}
    assert aliases == {"v0001": [], "v0002": ["champion"], "v0003": ["candidate"]}
    assert [v["parent"] for v in versions] == ["", "v0001", "v0002"]
    from mlflow import MlflowClient

    client = MlflowClient(ws.tracking_uri)
    mv3 = register.model_version_of(client, MODEL, "v0003")
    assert mv3.tags["landing.key"].endswith("incoming/adapters/tense/task.yaml") and mv3.tags["lineage.git_rev"]
    assert json.loads(mv3.tags["lineage.dvc_hashes"]).keys() >= {"versions/v0002", "versions/v0003"}
    run = client.get_run(mv3.run_id)
    # a run logs score.<task> only where the score changed against the parent's record (and every new task)
    rec2 = evaluate.read_record(ws, "v0002")
    changed = {t for t, s in rec3.scores.items() if rec2.scores.get(t) != s}
    assert {k.removeprefix("score.") for k in run.data.metrics if k.startswith("score.")} == changed
    assert all(run.data.metrics[f"score.{t}"] == rec3.scores[t] for t in changed) and "acc" in run.data.metrics
    assert not any(
        "secret" in k.lower() or "testing" in str(v) for k, v in {**run.data.params, **run.data.tags}.items()
    )

    # every version is an MLflow model: pyfunc serves rows of different tasks in one batch,
    # with the same answers as the version's own per-task forward
    import mlflow.pyfunc
    import pandas as pd
    import torch

    monkeypatch.setenv("MLFLOW_TRACKING_URI", ws.tracking_uri)  # models:/ resolves here; restored after the test
    served = mlflow.pyfunc.load_model(f"models:/{MODEL}@candidate")
    assert served.metadata.get_input_schema().input_names() == ["task", "text"]
    rows = [(name, r["text"]) for name in ("tense", "sentiment", "topic") for r in load_task(t[name]).eval[:4]]
    out = served.predict(pd.DataFrame({"task": [x[0] for x in rows], "text": [x[1] for x in rows]}))
    share, tok, _ = evaluate.loaded(str(ws.root), "v0003", st.read_manifest(ws.version_dir("v0003")).content_hash)
    for (name, text), label, probs in zip(rows, out["label"], out["probabilities"]):
        share.activate(name)
        with torch.no_grad():
            logits = share(
                **{k: v for k, v in tok([text], return_tensors="pt").items() if k != "token_type_ids"}
            ).logits[0]
        labels = load_task(t[name]).spec.labels
        assert label == labels[int(logits.argmax())] and len(probs) == len(labels) and abs(sum(probs) - 1) < 1e-5
    share.activate(None)
    with pytest.raises(Exception, match="unknown task"):
        served.predict(pd.DataFrame({"task": ["nope"], "text": ["x"]}))

    # a task exported to PEFT records what building its base needs: PeftModel loads it, no guessing
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    out = share.export_task("topic", chain["tmp"] / "export-topic")
    card = json.loads((out / "share_task.json").read_text())
    kwargs = card["from_pretrained_kwargs"]
    assert kwargs["num_labels"] == 4 and card["labels"][0] == "food" and card["base_model"] == BASE_ID
    base_model = AutoModelForSequenceClassification.from_pretrained(chain["model_dir"], **kwargs)
    peft = PeftModel.from_pretrained(base_model, str(out)).eval()
    enc = {
        k: v
        for k, v in tok([r["text"] for r in load_task(t["topic"]).eval[:4]], padding=True, return_tensors="pt").items()
    }
    share.activate("topic")
    with torch.no_grad():
        assert torch.allclose(share(**enc).logits, peft(**enc).logits, atol=1e-5)
    share.activate(None)

    # DVC: the dag shows each version's landing and parent; the remote holds what was pushed
    dag = lineage.dag(ws.root)
    for node in ("v0001", "v0002", "v0003", "landings/sentiment-", "landings/tense-"):
        assert node in dag
    deps = [d["path"] for d in lineage.locked_stage(ws.root, "v0002")["deps"]]
    assert len(deps) == 2 and deps[0].startswith("landings/topic-") and deps[1] == "versions/v0001"
    assert chain["s3"].list_objects_v2(Bucket=chain["bucket"], Prefix="dvcstore/")["KeyCount"] > 0
    # DVC reports the workspace: HEAD's metrics and the plots of every HEAD move
    shown = json.loads(lineage._dvc_cli(ws.root, "metrics", "show", "--json"))[""]["data"]["evaluations/metrics.json"][
        "data"
    ]
    assert shown["version"] == "v0003" and shown["acc"] == rec3.acc and shown["bwt"] == rec3.bwt and shown["tasks"] == 3
    history = ws.history_path.read_text().splitlines()
    assert [r.split(",")[1] for r in history[1:]] == ["v0001", "v0002", "v0003"]
    lineage._dvc_cli(ws.root, "plots", "show", "-o", str(chain["tmp"] / "plots"))
    page = (chain["tmp"] / "plots" / "index.html").read_text()
    assert "evaluations_history_csv" in page and "evaluations_heatmap.png" in page  # the ACC/BWT plot and the picture

    # the same landing again: a no-op
    before = snapshot(chain)
    from flows.continual import continual_update

    again = continual_update(key=first["key"], storage_url=chain["url"], workspace=str(ws.root), model_name=MODEL)
    assert again["status"] == "duplicate" and snapshot(chain) == before

    # rollback to v0001: champion and HEAD move, the artifact is byte-identical, metrics re-verify
    from flows.continual import rollback

    rb = rollback(str(ws.root), "v0001", model_name=MODEL, reason="test")
    assert (rb["champion"], rb["previous"], rb["verified"], ws.head()) == ("v0001", "v0002", True, "v0001")
    mv1 = register.model_version_of(client, MODEL, "v0001")
    assert (
        "champion" in client.get_registered_model(MODEL).aliases
        and client.get_model_version_by_alias(MODEL, "champion").version == mv1.version
    )
    import mlflow.artifacts

    restored = Path(
        mlflow.artifacts.download_artifacts(
            artifact_uri=mv1.source, dst_path=str(chain["tmp"] / "restored"), tracking_uri=ws.tracking_uri
        )
    )
    assert (restored / "manifest.json").read_bytes() == (ws.version_dir("v0001") / "manifest.json").read_bytes()
    assert (
        json.loads((restored / "dvc.json").read_text())["path"] == "versions/v0001"
    )  # the tensors are DVC's, stored once
    assert st.state_sha256(st.load(ws.version_dir("v0001"))) == mv1.tags["share.state_sha256"]
    assert client.get_run(rb["run_id"]).data.tags["share.event"] == "rollback"

    # the next landing builds on the rolled-back version
    fourth = land_and_update(chain, t["number"])
    assert fourth["version"] == "v0004"
    manifest = st.read_manifest(ws.version_dir("v0004"))
    assert manifest.parent == "v0001" and manifest.task_names == ["sentiment", "number"]
    assert "versions/v0001" in [d["path"] for d in lineage.locked_stage(ws.root, "v0004")["deps"]]

    # v0002 is a delta on v0001: with both gone locally (workspace and DVC cache), restoring
    # v0002 pulls its chain from the remote and the state is bit-exactly what was registered
    assert st.read_manifest(ws.version_dir("v0002")).storage["kind"] == "delta"
    digests = {v: tree_digest(ws.version_dir(v)) for v in ("v0001", "v0002")}
    for v in ("v0001", "v0002"):
        shutil.rmtree(ws.version_dir(v))
    shutil.rmtree(ws.root / ".dvc" / "cache")
    lineage.checkout_version(ws.root, "v0002")
    assert {v: tree_digest(ws.version_dir(v)) for v in ("v0001", "v0002")} == digests
    assert (
        st.state_sha256(st.load(ws.version_dir("v0002")))
        == register.model_version_of(client, MODEL, "v0002").tags["share.state_sha256"]
    )


def _edit(path: Path, old: str, new: str) -> None:
    path.write_text(path.read_text().replace(old, new))


def test_bad_landings_are_rejected_and_touch_nothing(chain):
    ws, t, storage = chain["ws"], chain["tasks"], chain["storage"]
    assert land_and_update(chain, t["sentiment"])["version"] == "v0001"
    tmp = chain["tmp"] / "bad"

    def bad_copy(src: Path, name: str) -> Path:
        d = tmp / name
        shutil.copytree(src, d)
        _edit(d / "task.yaml", f"name: {src.name}", f"name: {name}")
        return d

    cases = []
    d = bad_copy(t["topic"], "badlabel")
    _edit(d / "eval.jsonl", '"label": "food"', '"label": "cooking"')
    cases.append(("dataset", d, "badlabel", "expected one of"))
    d = bad_copy(t["topic"], "notrain")
    (d / "train.jsonl").unlink()
    cases.append(("dataset", d, "notrain", "missing"))
    d = bad_copy(t["topic"], "badyaml")
    (d / "task.yaml").write_text("name: badyaml\ntype: [\n")
    cases.append(("dataset", d, "badyaml", "invalid YAML"))
    d = adapter_landing(chain["tmp"], t["tense"], chain["model_dir"], targets=("query", "key"))
    cases.append(("adapter", d, "tense", "targets"))
    d = adapter_landing(chain["tmp"], t["number"], chain["model_dir"])
    (d / "adapter_model.safetensors").rename(d / "adapter_model.bin")
    cases.append(("adapter", d, "number", "pickle"))
    d = bad_copy(t["sentiment"], "dupe")
    _edit(d / "task.yaml", "name: dupe", "name: sentiment")
    (d / "train.jsonl").write_text("".join((d / "train.jsonl").read_text().splitlines(keepends=True)[1:]))
    cases.append(
        ("dataset", d, "sentiment", "already exists")
    )  # an overwrite of a processed landing is new, and checked again

    before = snapshot(chain)
    for kind, d, name, match in cases:
        out = land_and_update(chain, d, kind=kind, name=name)
        assert out["status"] == "rejected" and match in out["reason"], (d.name, out)
        lnd = next(x for x in storage.list_landings() if x.task == name)
        assert storage.status_of(lnd)["status"] == "rejected" and match in storage.status_of(lnd)["reason"]
        assert ws.ledger()[lnd.key]["status"] == "rejected"
    # nested keys never reach the disk and are refused
    prefix = "landings/incoming/datasets/nested"
    chain["s3"].put_object(Bucket=chain["bucket"], Key=f"{prefix}/sub/evil.jsonl", Body=b"{}")
    for f in ("train.jsonl", "eval.jsonl"):
        chain["s3"].upload_file(str(t["topic"] / f), chain["bucket"], f"{prefix}/{f}")
    chain["s3"].put_object(
        Bucket=chain["bucket"],
        Key=f"{prefix}/task.yaml",
        Body=(t["topic"] / "task.yaml").read_text().replace("name: topic", "name: nested").encode(),
    )
    from flows.continual import continual_update

    out = continual_update(
        key=f"{prefix}/task.yaml", storage_url=chain["url"], workspace=str(ws.root), model_name=MODEL
    )
    assert out["status"] == "rejected" and "not a plain file name" in out["reason"]
    assert snapshot(chain) == before  # no version, no registry entry, no lineage, nothing ingested


def test_batch_absorb_folds_every_pending_adapter_into_one_version(chain):
    from flows.continual import batch_absorb

    ws, t, storage = chain["ws"], chain["tasks"], chain["storage"]
    assert land_and_update(chain, t["sentiment"])["version"] == "v0001"
    for name in ("tense", "number"):
        storage.upload_task(adapter_landing(chain["tmp"], t[name], chain["model_dir"]), "adapter", name)
    out = batch_absorb(storage_url=chain["url"], workspace=str(ws.root), model_name=MODEL, tolerance=1.0)
    assert out["version"] == "v0002" and len(out["absorbed"]) == 2 and out["rejected"] == {}
    manifest = st.read_manifest(ws.version_dir("v0002"))
    assert manifest.task_names == ["sentiment", "number", "tense"] and manifest.parent == "v0001"  # in key order
    rec = evaluate.read_record(ws, "v0002")
    assert set(rec.scores) == {"sentiment", "tense", "number"}  # adapters brought eval.jsonl: scored too
    assert all(storage.status_of(x)["status"] == "processed" for x in storage.list_landings() if x.kind == "adapter")
    assert (
        batch_absorb(storage_url=chain["url"], workspace=str(ws.root), model_name=MODEL)["status"]
        == "nothing-to-absorb"
    )
