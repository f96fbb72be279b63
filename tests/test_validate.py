"""pipelines.validate: what a landing must be before it may change anything — good landings pass,
bad datasets and adapters are refused with their reason, a task the chain has is refused."""

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from pipelines.validate import LandingRejected, validate_landing
from share_core import state as st
from share_core.base import BaseSpec
from share_core.tasks import generate_tasks

from .conftest import save_peft_adapter

BASE = BaseSpec(model_id="tiny-bert", target_modules=["query", "value"], head_modules=["classifier"])


@pytest.fixture
def task_dirs(tmp_path):
    return generate_tasks(tmp_path / "tasks", names=["sentiment", "topic"], n_train=32, n_eval=16)


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
