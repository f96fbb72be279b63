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
from pipelines.workspace import Workspace
from share_core import state as st
from share_core.base import BaseSpec, load_base
from share_core.model import ShareModel
from share_core.peft_io import write_adapter
from share_core.synthetic import tiny_causal_lm
from share_core.taskdata import load_task
from share_core.tasks import generate_tasks
from share_core.train import evaluate, train_lora

from .chains import land, land_causal_chain

MODEL = "share-causal"
TASKS = ["plural", "antonym", "capital"]  # two datasets, then one adapter
TRAIN = {"steps": 150, "lr": 5e-3, "batch_size": 16, "max_length": 24}
MAX_NEW_TOKENS = 6


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return tiny_causal_lm(tmp_path_factory.mktemp("tiny-llama"), "llama", seed=0)


def causal_params(model_dir) -> Params:
    return Params().replace(
        base={"family": "causal-lm", "model_id": "tiny-llama", "model_path": str(model_dir)},
        train=TRAIN,
        evaluate={"max_new_tokens": MAX_NEW_TOKENS},
    )


def test_instruction_tasks_are_learned_retained_and_exported(tmp_path, prefect_harness, llama_dir):
    from flows.cli import app

    params = causal_params(llama_dir)
    ws = Workspace(tmp_path / "ws")
    lineage.init_workspace(ws.root, params=params)
    url = (tmp_path / "bucket").as_uri()
    dirs = generate_tasks(tmp_path / "tasks", names=TASKS, n_train=256, n_eval=32)
    data = {d.name: load_task(d) for d in dirs}
    model, tok = load_base(params.base)
    untrained = {
        t: evaluate(model, tok, d, TRAIN["max_length"], max_new_tokens=MAX_NEW_TOKENS) for t, d in data.items()
    }

    # the third task arrives as a PEFT CAUSAL_LM LoRA trained elsewhere (on q/k/v/o/gate/up/down)
    adapter = train_lora(
        model, tok, data["capital"], params.train, params.base.targets(), params.base.heads(), "tiny-llama"
    )
    outs = land_causal_chain(ws, url, dirs, adapter, MODEL)
    assert [o["status"] for o in outs] == ["processed"] * 3, outs
    assert ws.version_ids() == ["v0001", "v0002", "v0003"]

    record = ev.read_record(ws, "v0003")
    for t in TASKS:  # learned: far above the untrained model (which answers nothing right)
        assert record.scores[t] >= untrained[t] + 0.5, (t, record.scores[t], untrained[t])
        assert record.first_scores[t] >= untrained[t] + 0.5
    assert record.bwt >= -0.005  # retained: strict Share, the basis holds every task
    assert record.majority == pytest.approx(untrained)  # a generative task's baseline: the untrained base's score

    # a classification landing on a causal-LM workspace: rejected with the reason, nothing changes
    cls_dir = generate_tasks(tmp_path / "cls", names=["sentiment"], n_train=32, n_eval=8)[0]
    out = land(ws, url, cls_dir, "dataset", MODEL)
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
        gen = peft.generate(
            input_ids=ids,
            max_new_tokens=MAX_NEW_TOKENS,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
    answers = [tok.decode(g[ids.shape[1] :], skip_special_tokens=True).strip() for g in gen]
    exact = sum(a == r["completion"] for a, r in zip(answers, batch)) / len(batch)
    assert exact >= record.scores["plural"] - 0.25  # 8 rows of its 32


def test_gpt2_adapter_landings_are_validated_and_absorbed_data_free(tmp_path):
    """PEFT CAUSAL_LM LoRAs of a GPT-2 base (Conv1D layers) pass validation and are absorbed
    without data; the absorbed task reproduces its adapter; an adapter or task of the other
    family is refused with the reason."""
    from pipelines.update import build_version
    from pipelines.validate import LandingRejected, validate_landing

    base = BaseSpec(
        family="causal-lm", model_id="tiny-gpt2", model_path=str(tiny_causal_lm(tmp_path / "gpt2", "gpt2", seed=0))
    )
    params = Params().replace(
        base={"family": base.family, "model_id": base.model_id, "model_path": base.model_path},
        train={"steps": 20, "rank": 4, "lora_alpha": 8, "max_length": 24},
    )
    model, tok = load_base(base)
    landings, adapters = {}, {}
    for name in ("plural", "capital"):
        task_dir = generate_tasks(tmp_path / "tasks", names=[name], n_train=64, n_eval=16)[0]
        adapters[name] = train_lora(
            model, tok, load_task(task_dir), params.train, base.targets(), base.heads(), base.model_id
        )
        adapters[name].task_type = "CAUSAL_LM"
        landings[name] = write_adapter(tmp_path / "landings" / name, adapters[name])
        for f in ("task.yaml", "eval.jsonl"):
            shutil.copy(task_dir / f, landings[name] / f)
    assert validate_landing(landings["plural"], "adapter", "plural", None, base).type == "causal-lm"
    v1 = build_version([landings["plural"]], "adapter", tmp_path / "versions" / "v0001", None, params)
    assert validate_landing(landings["capital"], "adapter", "capital", v1, base).name == "capital"
    build_version(
        [landings["capital"]], "adapter", tmp_path / "versions" / "v0002", tmp_path / "versions" / "v0001", params
    )

    share = ShareModel(load_base(base)[0], st.load(tmp_path / "versions" / "v0002")).eval()
    assert sorted(share.state.target_modules) == ["c_attn", "c_fc", "c_proj"]
    ids = torch.tensor([tok("plural of city")["input_ids"]])
    out = tmp_path / "peft-capital"
    write_adapter(out, adapters["capital"], fan_in_fan_out=True)
    share.activate("capital")
    with torch.no_grad():
        peft = PeftModel.from_pretrained(load_base(base)[0], str(out)).eval()
        assert torch.allclose(share(input_ids=ids).logits, peft(input_ids=ids).logits, atol=1e-4)

    # the other family's adapter (PEFT task_type SEQ_CLS) and the other family's task are refused
    cfg = json.loads((landings["capital"] / "adapter_config.json").read_text())
    wrong = tmp_path / "wrong" / "capital"
    shutil.copytree(landings["capital"], wrong)
    (wrong / "adapter_config.json").write_text(json.dumps({**cfg, "task_type": "SEQ_CLS"}))
    with pytest.raises(
        LandingRejected, match="task_type 'SEQ_CLS' does not match this workspace's 'causal-lm' base model"
    ):
        validate_landing(wrong, "adapter", "capital", None, base)
    cls_dir = generate_tasks(tmp_path / "cls", names=["topic"], n_train=16, n_eval=8)[0]
    with pytest.raises(
        LandingRejected, match="type 'sequence-classification' does not match this workspace's base model 'tiny-gpt2'"
    ):
        validate_landing(cls_dir, "dataset", "topic", v1, base)
