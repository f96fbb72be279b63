"""The causal-LM family through the real chain: a tiny random Llama (built from a config, no
download) named in the workspace's params.yaml; two generated instruction datasets and one PEFT
CAUSAL_LM adapter trained elsewhere land in local storage; the continual-update flow (Prefect's
test harness, MLflow on sqlite, DVC in a temporary git repo) turns them into three versions,
scored by batched greedy generation in mixed-task batches. A classification landing on this
workspace is rejected with the reason and changes nothing; `share export` gives a PEFT adapter
that PeftModel.from_pretrained loads with equal logits."""

import json
import shutil

import pytest
import torch
from peft import PeftModel
from typer.testing import CliRunner

from pipelines import evaluate as ev
from pipelines import lineage
from pipelines.params import Params
from pipelines.storage import open_storage
from pipelines.workspace import Workspace
from share_core import state as st
from share_core.base import load_base
from share_core.model import ShareModel
from share_core.peft_io import write_adapter
from share_core.synthetic import tiny_causal_lm
from share_core.taskdata import load_task
from share_core.tasks import generate_tasks
from share_core.train import evaluate, train_lora

MODEL = "share-causal"
TASKS = ["plural", "antonym", "capital"]  # two datasets, then one adapter
TRAIN = {"steps": 150, "lr": 5e-3, "batch_size": 16, "max_length": 24}
MAX_NEW_TOKENS = 6


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return tiny_causal_lm(tmp_path_factory.mktemp("tiny-llama"), "llama", seed=0)


def causal_params(model_dir) -> Params:
    return Params().replace(base={"family": "causal-lm", "model_id": "tiny-llama", "model_path": str(model_dir)}, train=TRAIN, evaluate={"max_new_tokens": MAX_NEW_TOKENS})


def test_instruction_tasks_are_learned_retained_and_exported(tmp_path, prefect_harness, llama_dir):
    from flows.cli import app
    from flows.continual import continual_update

    params = causal_params(llama_dir)
    ws = Workspace(tmp_path / "ws")
    lineage.init_workspace(ws.root, params=params)
    url = (tmp_path / "bucket").as_uri()
    storage = open_storage(url)
    dirs = generate_tasks(tmp_path / "tasks", names=TASKS, n_train=256, n_eval=32)
    data = {d.name: load_task(d) for d in dirs}
    model, tok = load_base(params.base)
    untrained = {t: evaluate(model, tok, d, TRAIN["max_length"], max_new_tokens=MAX_NEW_TOKENS) for t, d in data.items()}

    # the third task arrives as a PEFT CAUSAL_LM LoRA trained elsewhere (on q/k/v/o/gate/up/down)
    adapter = train_lora(model, tok, data["capital"], params.train, params.base.targets(), params.base.heads(), "tiny-llama")
    adapter.task_type = "CAUSAL_LM"
    adapter_dir = write_adapter(tmp_path / "adapters" / "capital", adapter)
    for f in ("task.yaml", "eval.jsonl"):
        shutil.copy(dirs[2] / f, adapter_dir / f)

    def land(task_dir, kind):
        key = storage.upload_task(task_dir, kind, task_dir.name)
        return continual_update(key=key, storage_url=url, workspace=str(ws.root), model_name=MODEL, tolerance=1.0)

    outs = [land(dirs[0], "dataset"), land(dirs[1], "dataset"), land(adapter_dir, "adapter")]
    assert [o["status"] for o in outs] == ["processed"] * 3, outs
    assert ws.version_ids() == ["v0001", "v0002", "v0003"]

    record = ev.read_record(ws, "v0003")
    for t in TASKS:  # learned: far above the untrained model (which answers nothing right)
        assert record["scores"][t] >= untrained[t] + 0.5, (t, record["scores"][t], untrained[t])
        assert record["first_scores"][t] >= untrained[t] + 0.5
    assert record["bwt"] >= -0.005  # retained: strict Share, the basis holds every task
    assert record["majority"] == {t: None for t in TASKS}  # generation has no majority baseline

    # a classification landing on a causal-LM workspace: rejected with the reason, nothing changes
    cls_dir = generate_tasks(tmp_path / "cls", names=["sentiment"], n_train=32, n_eval=8)[0]
    out = land(cls_dir, "dataset")
    assert out["status"] == "rejected"
    assert "type 'sequence-classification'" in out["reason"] and "serves 'causal-lm' tasks" in out["reason"]
    assert ws.version_ids() == ["v0001", "v0002", "v0003"] and ws.head() == "v0003"

    # export → PEFT: the adapter loads with equal logits, no guessing of the task type
    out_dir = tmp_path / "export-plural"
    result = CliRunner().invoke(app, ["export", "v0003", "plural", str(out_dir), "--workspace", str(ws.root)])
    assert result.exit_code == 0, result.output
    assert json.loads((out_dir / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"
    share = ShareModel(load_base(params.base)[0], st.load(ws.version_dir("v0003"))).eval()
    share.activate("plural")
    batch = data["plural"].eval[:8]
    ids = torch.tensor([tok(r["prompt"])["input_ids"] for r in batch])
    peft = PeftModel.from_pretrained(load_base(params.base)[0], str(out_dir)).eval()
    with torch.no_grad():
        assert torch.allclose(share(input_ids=ids).logits, peft(input_ids=ids).logits, atol=1e-5)
        # and PEFT's greedy answers are the version's: the exported adapter is the task
        gen = peft.generate(input_ids=ids, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    answers = [tok.decode(g[ids.shape[1]:], skip_special_tokens=True).strip() for g in gen]
    exact = sum(a == r["completion"] for a, r in zip(answers, batch)) / len(batch)
    assert exact >= record["scores"]["plural"] - 0.25  # 8 rows of its 32
