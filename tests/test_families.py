"""The causal-LM family in share_core on a tiny random GPT-2 (Conv1D layers) with the generated
instruction tasks: train a LoRA, initialise, train a second task in the subspace, merge; scoring
by greedy generation in mixed-task batches equals scoring each task alone; export to PEFT with
identical logits."""

import json
import logging

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from share_core.base import BaseSpec
from share_core.families import CausalLM, completion_metric
from share_core.model import ShareModel
from share_core.subspace import KPolicy
from share_core.synthetic import tiny_causal_lm
from share_core.taskdata import TaskData
from share_core.tasks import generate_task
from share_core.train import TrainConfig, evaluate, train_lora, train_task


def task(name: str) -> TaskData:
    spec, train, eval_rows = generate_task(name, seed=0, n_train=192, n_eval=24)
    return TaskData(spec=spec, train=train, eval=eval_rows, root=None)


def test_completion_metrics():
    assert completion_metric("exact_match", " Dogs ", "dogs") == 1.0
    assert completion_metric("exact_match", "dog", "dogs") == 0.0
    assert abs(completion_metric("rouge_l", "one two three", "one two three four") - 2 * 0.75 / 1.75) < 1e-9


def test_gpt2_trains_merges_scores_mixed_and_exports(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="share_core.train")
    path = tiny_causal_lm(tmp_path / "gpt2", "gpt2", seed=0)
    base = BaseSpec(family="causal-lm", model_id="tiny-gpt2", model_path=str(path))
    assert base.targets() == ["c_attn", "c_proj", "c_fc"] and base.heads() == []
    model, tok = AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    cfg = TrainConfig(steps=120, batch_size=16, lr=1e-2, rank=4, lora_alpha=8, max_length=24, progress=False)
    first, second = task("plural"), task("capital")
    untrained = evaluate(model, tok, second, cfg.max_length, max_new_tokens=6)
    adapter = train_lora(model, tok, first, cfg, base.targets(), [], "tiny-gpt2")
    share = ShareModel.from_adapters(model, [adapter], base_model_id="tiny-gpt2", policy=KPolicy(k_max=32), phi=2)
    share.activate("plural")
    score1 = evaluate(share, tok, first, cfg.max_length, max_new_tokens=6)
    train_task(share, tok, second, cfg)
    assert share.last_errors["capital"] < 1e-5  # k=32 holds the new task exactly
    progress = [r.getMessage() for r in caplog.records if r.name == "share_core.train"]
    assert len(progress) == 20 and progress[-1].startswith(
        "Share capital: step 120/120, loss "
    )  # the bar is off: 10 loss lines per fit
    share.activate("capital")
    score2 = evaluate(share, tok, second, cfg.max_length, max_new_tokens=6)
    assert score2 > untrained + 0.4
    share.activate("plural")
    assert (
        abs(evaluate(share, tok, first, cfg.max_length, max_new_tokens=6) - score1) < 1e-9
    )  # strict: the first task is untouched

    # one mixed batch of both tasks' rows (interleaved) scores exactly like each task alone
    items = [x for pair in zip(*[[(t.spec.name, t.spec, r) for r in t.eval] for t in (first, second)]) for x in pair]
    mixed = CausalLM().score(share, tok, items, max_length=cfg.max_length, batch_size=16, max_new_tokens=6)
    assert mixed["plural"]["score"] == score1 and mixed["capital"]["score"] == score2
    assert mixed["plural"]["margin"] > 0
    fam = CausalLM()  # and row by row, the mixed batch generates exactly each task's own completion
    texts = fam.predict(
        share,
        tok,
        [t for t, _, _ in items],
        [r["prompt"] for _, _, r in items],
        max_length=cfg.max_length,
        batch_size=16,
        max_new_tokens=6,
    )
    for name in ("plural", "capital"):
        share.activate(name)
        own = [x for x in items if x[0] == name]
        alone, _ = fam._generate(share, tok, own, cfg.max_length, 6, mixed=False)
        assert [t for t, x in zip(texts, items) if x[0] == name] == alone

    out = share.export_task("capital", tmp_path / "capital", task_type="CAUSAL_LM")
    cfg_json = json.loads((out / "adapter_config.json").read_text())
    assert cfg_json["fan_in_fan_out"] is True and cfg_json["task_type"] == "CAUSAL_LM"
    ids = torch.tensor([tok(r["prompt"])["input_ids"] for r in second.eval])
    share.activate("capital")
    with torch.no_grad():
        ours = share(input_ids=ids).logits
        peft = (
            PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(path), str(out)).eval()(input_ids=ids).logits
        )
    assert torch.allclose(ours, peft, atol=1e-5)
