"""The causal-LM path on a tiny GPT-2 (Conv1D layers): train a LoRA, initialise, train a second
task in the subspace, merge, and export to PEFT with identical logits."""

import json

import torch
from peft import PeftModel
from transformers import GPT2Config, GPT2LMHeadModel

from share_core.model import ShareModel
from share_core.subspace import KPolicy
from share_core.taskdata import TaskData, TaskSpec
from share_core.train import TrainConfig, evaluate, train_lora, train_task

from .test_model import CharTokenizer


def tiny_gpt2():
    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=64, bos_token_id=1, eos_token_id=1)
    return GPT2LMHeadModel(cfg).eval()


def counting_task(name, step):
    """Cycles through 6 words by `step`: a bigram rule a tiny model learns in a few steps."""
    words = ["red", "green", "blue", "cyan", "pink", "gray"]
    rows = [{"text": " ".join(words[(s + step * j) % 6] for j in range(10))} for s in range(36)]
    return TaskData(spec=TaskSpec(name=name, type="causal-lm"), train=rows[:30], eval=rows[30:], root=None)


def test_gpt2_trains_merges_and_exports(tmp_path):
    tok = CharTokenizer()
    cfg = TrainConfig(steps=60, batch_size=8, lr=3e-2, rank=4, lora_alpha=8, progress=False)
    first, second = counting_task("count1", 1), counting_task("count3", 5)
    model = tiny_gpt2()
    base_score = evaluate(model, tok, second)
    adapter = train_lora(model, tok, first, cfg, ["c_attn"], [], "tiny-gpt2")
    share = ShareModel.from_adapters(model, [adapter], base_model_id="tiny-gpt2", policy=KPolicy(k_max=32), phi=2)
    share.activate("count1")
    score1 = evaluate(share, tok, first)
    train_task(share, tok, second, cfg)
    assert share.last_errors["count3"] < 1e-5  # k=32 holds the new task exactly
    share.activate("count3")
    assert evaluate(share, tok, second) > base_score + 0.2
    share.activate("count1")
    assert abs(evaluate(share, tok, first) - score1) < 1e-6  # strict: the first task is untouched
    out = share.export_task("count3", tmp_path / "count3")
    assert json.loads((out / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    x = tok([r["text"] for r in second.eval])["input_ids"]
    share.activate("count3")
    with torch.no_grad():
        ours = share(input_ids=x).logits
        peft = PeftModel.from_pretrained(tiny_gpt2(), str(out)).eval()(input_ids=x).logits
    assert torch.allclose(ours, peft, atol=1e-5)
