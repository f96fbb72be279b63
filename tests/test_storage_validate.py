"""Storage backends (local dir and S3 on a moto server) and landing validation: the pieces that
decide what a landing is and whether it may change anything."""

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from pipelines.register import forgetting_gate
from pipelines.storage import LocalStorage, StorageError, open_storage
from pipelines.validate import LandingRejected, validate_landing
from share_core import state as st
from share_core.base import BaseSpec
from share_core.tasks import generate_tasks

from .conftest import evaluation_record, save_peft_adapter

BASE = BaseSpec(model_id="tiny-bert", target_modules=["query", "value"], head_modules=["classifier"])


@pytest.fixture
def task_dirs(tmp_path):
    return generate_tasks(tmp_path / "tasks", names=["sentiment", "topic"], n_train=32, n_eval=16)


def test_landings_complete_only_with_task_yaml_and_etag_covers_every_object(storage, task_dirs, tmp_path):
    d = task_dirs[0]
    prefix = storage.prefix + "/" if storage.prefix else ""
    storage.put(f"{prefix}incoming/datasets/{d.name}/train.jsonl", d / "train.jsonl")
    assert storage.list_landings() == []  # no task.yaml yet: incomplete
    key = storage.upload_task(d, "dataset", d.name)
    [landing] = storage.list_landings()
    assert (landing.key, landing.kind, landing.task) == (key, "dataset", "sentiment")
    assert landing.files == ("eval.jsonl", "task.yaml", "train.jsonl")
    # a changed train.jsonl under the same task.yaml is a new landing (new ETag)
    rows = (d / "train.jsonl").read_text().splitlines()
    (tmp_path / "train.jsonl").write_text("\n".join(rows[1:]) + "\n")
    storage.put(f"{prefix}incoming/datasets/{d.name}/train.jsonl", tmp_path / "train.jsonl")
    [again] = storage.list_landings()
    assert again.key == landing.key and again.etag != landing.etag
    assert storage.landing(key) == again  # the one-landing lookup lists only that landing's objects
    assert (
        storage.landing(key.replace("sentiment", "nosuchtask")) is None
        and storage.landing(f"{prefix}incoming/datasets/x/train.jsonl") is None
    )
    storage.mark(again, "rejected", {"reason": "because"})
    status = storage.status_of(again)
    assert status.pop("at") and status == {"key": key, "etag": again.etag, "status": "rejected", "reason": "because"}
    assert storage.status_of(landing) is None  # the status is per (key, ETag): the first content was never marked
    assert len(storage.list_landings()) == 1  # the status record is not a landing


def test_download_never_writes_unsafe_names(storage, task_dirs, tmp_path):
    d = task_dirs[0]
    prefix = storage.prefix + "/" if storage.prefix else ""
    storage.put(f"{prefix}incoming/datasets/{d.name}/nested/evil.jsonl", d / "train.jsonl")
    storage.upload_task(d, "dataset", d.name)
    [landing] = storage.list_landings()
    assert "nested/evil.jsonl" in landing.files
    out = storage.download(landing, tmp_path / "dl")
    assert sorted(p.name for p in out.iterdir()) == ["eval.jsonl", "task.yaml", "train.jsonl"]
    with pytest.raises(LandingRejected, match="not a plain file name"):
        validate_landing(out, landing.kind, landing.task, None, BASE, list(landing.files))


def test_storage_urls_are_checked(tmp_path):
    with pytest.raises(StorageError, match="credentials"):
        open_storage("s3://key:secret@bucket/p")
    with pytest.raises(StorageError, match="unknown options"):
        open_storage("s3://bucket/p?endpoint=x")
    with pytest.raises(StorageError, match="scheme"):
        open_storage("ftp://host/x")
    with pytest.raises(StorageError, match="escapes"):
        LocalStorage(tmp_path).put("../outside.txt", b"x")
    assert not (tmp_path.parent / "outside.txt").exists()


def _manifest(task_names=("sentiment",)):
    return st.Manifest.from_json(
        {
            "format": st.FORMAT,
            "base_model": {"id": BASE.model_id, "hash": "x"},
            "target_modules": ["query", "value"],
            "head_modules": ["classifier"],
            "layers": {
                f"bert.encoder.layer.{i}.attention.self.{m}": {"n": 32, "d": 32, "k_B": 4, "k_A": 4}
                for i in range(2)
                for m in ("query", "value")
            },
            "phi": 1.0,
            "policy": {},
            "tasks": [{"name": t, "rank": 4, "scale": 1.0, "heads": [], "info": {}} for t in task_names],
            "parent": None,
            "extra": {},
            "storage": {},
            "state_sha256": "",
            "files": {},
            "content_hash": "",
        }
    )


def _adapter_landing(tmp_path, name, num_labels=2, **kw):
    """A real PEFT adapter of the tiny BERT (2-label head by default), landed with its task.yaml."""
    d = save_peft_adapter(tmp_path / name, seed=3, num_labels=num_labels, **kw)
    src = generate_tasks(tmp_path / "src", names=[name], n_train=16, n_eval=8)[0]
    shutil.copy(src / "task.yaml", d / "task.yaml")
    shutil.copy(src / "eval.jsonl", d / "eval.jsonl")
    (d / "README.md").unlink(missing_ok=True)  # PEFT writes a model card; landings carry only their files
    return d


def test_good_landings_pass(task_dirs, tmp_path):
    assert validate_landing(task_dirs[1], "dataset", "topic", _manifest(), BASE).labels == (
        "food",
        "politics",
        "sports",
        "technology",
    )
    adapter = _adapter_landing(tmp_path, "number")
    assert validate_landing(adapter, "adapter", "number", _manifest(), BASE).name == "number"


def _edit_json_lines(path, fn):
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    fn(rows)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


BAD_DATASETS = {
    "label outside the label set": (
        lambda d: _edit_json_lines(d / "eval.jsonl", lambda r: r[0].update(label="maybe")),
        "expected one of",
    ),
    "missing train.jsonl": (lambda d: (d / "train.jsonl").unlink(), "missing"),
    "invalid yaml": (lambda d: (d / "task.yaml").write_text("name: [unclosed\n"), "invalid YAML"),
    "name differs from its directory": (
        lambda d: (d / "task.yaml").write_text((d / "task.yaml").read_text().replace("name: topic", "name: other")),
        "differs",
    ),
    "too few rows": (
        lambda d: _edit_json_lines(d / "train.jsonl", lambda r: r.__delitem__(slice(3, None))),
        "at least",
    ),
    "not json": (lambda d: (d / "train.jsonl").write_text("{not json\n"), "invalid JSON"),
    "unknown file": (lambda d: (d / "model.py").write_text("import os"), "unexpected file"),
    "causal-lm type": (
        lambda d: (d / "task.yaml").write_text("name: topic\ntype: causal-lm\n"),
        "serves 'sequence-classification' tasks",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_DATASETS))
def test_bad_datasets_are_rejected_with_their_reason(task_dirs, case):
    make, match = BAD_DATASETS[case]
    d = task_dirs[1]
    make(d)
    with pytest.raises(LandingRejected, match=match):
        validate_landing(d, "dataset", "topic", _manifest(), BASE)


def test_existing_task_is_rejected(task_dirs):
    with pytest.raises(LandingRejected, match="already exists"):
        validate_landing(task_dirs[0], "dataset", "sentiment", _manifest(), BASE)


def _nan(d):
    sd = load_file(d / "adapter_model.safetensors")
    k = next(k for k in sd if "lora_B" in k)
    sd[k][0, 0] = float("inf")
    save_file(sd, d / "adapter_model.safetensors")


BAD_ADAPTERS = {
    "pickle weights": (lambda d: (d / "adapter_model.safetensors").rename(d / "adapter_model.bin"), {}, "pickle"),
    "other target modules": (None, {"targets": ("query", "key")}, "targets"),
    "other base model": (None, {"base_name": "bert-large"}, "base model"),
    "other layer shapes": (None, {"hidden_size": 48}, "base layer is 32×32"),
    "non-finite weights": (_nan, {}, "NaN/Inf"),
    "truncated safetensors": (
        lambda d: (d / "adapter_model.safetensors").write_bytes((d / "adapter_model.safetensors").read_bytes()[:100]),
        {},
        "corrupt",
    ),
    "head for another label count": (None, {"num_labels": 3}, "outputs for labels"),
}


@pytest.mark.parametrize("case", sorted(BAD_ADAPTERS))
def test_bad_adapters_are_rejected_with_their_reason(tmp_path, case):
    edit, kw, match = BAD_ADAPTERS[case]
    d = _adapter_landing(tmp_path, "number", **kw)
    if edit:
        edit(d)
    with pytest.raises(LandingRejected, match=match):
        validate_landing(d, "adapter", "number", _manifest(), BASE)


def test_forgetting_gate():
    champ = evaluation_record("v0002", {"a": 0.90, "b": 0.80})
    assert forgetting_gate(evaluation_record("v0003", {"a": 0.895, "b": 0.85, "c": 0.7}), champ, 0.01)["passed"]
    failed = forgetting_gate(evaluation_record("v0003", {"a": 0.87, "b": 0.85}), champ, 0.01)
    assert not failed["passed"] and failed["worst_drop"] == pytest.approx(0.03)
    assert forgetting_gate(evaluation_record("v0001", {"a": 0.1}), None, 0.01)[
        "passed"
    ]  # the first version always serves
