"""Generated instruction (causal-LM) tasks and the tiny random causal LM they are learned on:
the generators are deterministic and write tasks that load, the model directory loads offline
and is byte-identical for a seed, its word-level tokenizer round-trips the vocabulary, and a
LoRA learns a task from scratch on the CPU (the recipe below: every instruction task reaches
exact match ≥ 0.9 with it, the untrained model 0).

Recipe: PEFT LoRA r=8, lora_alpha=16 on q,k,v,o,gate,up,down projections (no trainable head);
loss on the completion and EOS only; AdamW (no weight decay), constant lr 5e-3, 150 steps of
batch 16 from 256 training rows, right padding; greedy left-padded generation of ≤ 8 tokens
stopped at EOS, compared whitespace-normalised.
"""

import random
import re

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from share_core.synthetic import SPECIAL_TOKENS, tiny_causal_lm
from share_core.taskdata import CAUSAL_LM, load_task
from share_core.tasks import (
    INSTRUCTION_GENERATORS,
    INSTRUCTION_TASK_NAMES,
    INSTRUCTION_VOCABULARY,
    TASK_NAMES,
    generate_task,
    generate_tasks,
)

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
STEPS, LR, BATCH = 150, 5e-3, 16


def words(text: str) -> list[str]:
    return re.findall(r"\w+|[^\w\s]+", text)


# ---- the generators ----
def test_instruction_tasks_are_deterministic_and_distinct():
    assert len(INSTRUCTION_TASK_NAMES) >= 6 and not set(INSTRUCTION_TASK_NAMES) & set(TASK_NAMES)
    assert TASK_NAMES == ("sentiment", "topic", "question", "tense", "number", "intent", "urgency")
    keywords = {}
    for name in INSTRUCTION_TASK_NAMES:
        spec, train, eval_rows = generate_task(name, seed=3, n_train=64, n_eval=16)
        assert (spec, train, eval_rows) == generate_task(name, seed=3, n_train=64, n_eval=16)
        assert train != generate_task(name, seed=4, n_train=64, n_eval=16)[1]
        assert spec.type == CAUSAL_LM and spec.labels == () and spec.metric in ("exact_match", "rouge_l")
        for row in train + eval_rows:
            assert set(row) == {"prompt", "completion"}
            assert 1 <= len(row["completion"].split()) <= 4
        firsts = {words(r["prompt"])[0] for r in train}
        assert len(firsts) == 1  # one keyword per task...
        keywords[name] = firsts.pop()
    assert len(set(keywords.values())) == len(keywords)  # ...and no two tasks share it
    metrics = {generate_task(n, n_train=1, n_eval=1)[0].metric for n in INSTRUCTION_TASK_NAMES}
    assert metrics == {"exact_match", "rouge_l"}
    with pytest.raises(ValueError, match="known tasks.*sentiment.*reverse"):
        generate_task("no-such-task")


def test_vocabulary_is_exactly_what_the_tasks_use():
    assert INSTRUCTION_VOCABULARY == sorted(set(INSTRUCTION_VOCABULARY))
    seen = set()
    rng = random.Random(0)
    for gen in INSTRUCTION_GENERATORS.values():
        for _ in range(2000):
            prompt, completion = gen(rng)
            seen.update(words(prompt) + words(completion))
    assert seen == set(INSTRUCTION_VOCABULARY)


def test_generate_tasks_mixes_kinds_and_the_rows_load(tmp_path):
    names = [*INSTRUCTION_TASK_NAMES, "sentiment"]
    dirs = generate_tasks(tmp_path, names, seed=1, n_train=40, n_eval=10)
    assert [d.name for d in dirs] == names
    for d in dirs:
        task = load_task(d)
        assert len(task.train) == 40 and len(task.eval) == 10
        if d.name == "sentiment":
            assert task.spec.is_classification and task.spec.labels == ("negative", "positive")
        else:
            assert task.spec.type == CAUSAL_LM
            assert task.train == generate_task(d.name, seed=1, n_train=40, n_eval=10)[1]
    again = generate_tasks(tmp_path / "again", names, seed=1, n_train=40, n_eval=10)
    for a, b in zip(dirs, again):
        for f in ("task.yaml", "train.jsonl", "eval.jsonl"):
            assert (a / f).read_bytes() == (b / f).read_bytes()


# ---- the tiny model ----
@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return tiny_causal_lm(tmp_path_factory.mktemp("tiny-llama") / "model", "llama", seed=0)


def test_tiny_model_is_byte_identical_per_seed_and_loads(tiny_llama, tmp_path):
    state = torch.random.get_rng_state()
    same = tiny_causal_lm(tmp_path / "same", "llama", seed=0)
    assert torch.equal(state, torch.random.get_rng_state())  # the global RNG is untouched
    files = sorted(p.name for p in tiny_llama.iterdir())
    assert "model.safetensors" in files and "tokenizer.json" in files
    assert files == sorted(p.name for p in same.iterdir())
    for f in files:
        assert (tiny_llama / f).read_bytes() == (same / f).read_bytes(), f
    other = tiny_causal_lm(tmp_path / "other", "llama", seed=1)
    assert (other / "model.safetensors").read_bytes() != (tiny_llama / "model.safetensors").read_bytes()

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    for arch, path in (("llama", tiny_llama), ("gpt2", tiny_causal_lm(tmp_path / "gpt2", "gpt2", seed=0))):
        model = AutoModelForCausalLM.from_pretrained(path)
        cfg = model.config
        assert cfg.model_type == arch and cfg.vocab_size == len(tok) == len(INSTRUCTION_VOCABULARY) + len(
            SPECIAL_TOKENS
        )
        assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (
            tok.bos_token_id,
            tok.eos_token_id,
            tok.pad_token_id,
        )
        assert sum(p.numel() for p in model.parameters()) < 200_000
        with torch.no_grad():
            logits = model(**tok(["reverse : red cat anna ="], return_tensors="pt")).logits
        assert logits.shape == (1, 7, cfg.vocab_size) and torch.isfinite(logits).all()


def test_tokenizer_round_trips_the_vocabulary(tiny_llama):
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    assert [tok.pad_token, tok.unk_token, tok.bos_token, tok.eos_token] == list(SPECIAL_TOKENS)
    for w in INSTRUCTION_VOCABULARY:
        ids = tok(w, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and ids[0] != tok.unk_token_id, w
        assert tok.decode(ids) == w
    assert tok.convert_ids_to_tokens(tok("last word:red")["input_ids"]) == ["<s>", "last", "word", ":", "red"]
    assert tok("unheard-of")["input_ids"][1] == tok.unk_token_id
    for name in INSTRUCTION_TASK_NAMES:
        _, rows, _ = generate_task(name, n_train=20, n_eval=0)
        for row in rows:
            for text in row.values():
                assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == " ".join(text.split())


# ---- a LoRA learns the tasks ----
def train_batch(tok, rows):
    """Right-padded prompt (with <s>) + completion + </s>; loss on the completion and </s> only."""
    seqs, labels = [], []
    for r in rows:
        p = tok(r["prompt"])["input_ids"]
        c = tok(r["completion"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        seqs.append(p + c)
        labels.append([-100] * len(p) + c)
    width = max(map(len, seqs))
    pad = [width - len(s) for s in seqs]
    return (
        torch.tensor([s + [tok.pad_token_id] * n for s, n in zip(seqs, pad)]),
        torch.tensor([[1] * len(s) + [0] * n for s, n in zip(seqs, pad)]),
        torch.tensor([lab + [-100] * n for lab, n in zip(labels, pad)]),
    )


@torch.no_grad()
def exact_match(model, tok, rows) -> float:
    model.eval()
    tok.padding_side = "left"
    enc = tok([r["prompt"] for r in rows], return_tensors="pt", padding=True)
    tok.padding_side = "right"
    out = model.generate(
        **enc, max_new_tokens=8, do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    hits = 0
    for seq, row in zip(out[:, enc["input_ids"].shape[1] :].tolist(), rows):
        seq = seq[: seq.index(tok.eos_token_id)] if tok.eos_token_id in seq else seq
        hits += " ".join(tok.decode(seq, skip_special_tokens=True).split()) == " ".join(row["completion"].split())
    return hits / len(rows)


def train_lora(path, tok, rows, seed=0):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = get_peft_model(
            AutoModelForCausalLM.from_pretrained(path),
            LoraConfig(r=8, lora_alpha=16, target_modules=LLAMA_TARGETS, lora_dropout=0.0),
        )
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.0)
    rng = random.Random(seed)
    model.train()
    for _ in range(STEPS):
        ids, mask, labels = train_batch(tok, rng.sample(rows, BATCH))
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    return model


@pytest.mark.parametrize("name", ["reverse", "plural"])  # a copy transform (the slowest to learn) and a lookup
def test_lora_learns_an_instruction_task(tiny_llama, name):
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    _, train, eval_rows = generate_task(name, seed=0, n_train=256, n_eval=32)
    assert exact_match(AutoModelForCausalLM.from_pretrained(tiny_llama), tok, eval_rows) <= 0.05
    model = train_lora(tiny_llama, tok, train)
    assert exact_match(model, tok, eval_rows) > 0.5
    other = "capital" if name != "capital" else "plural"
    assert (
        exact_match(model, tok, generate_task(other, seed=0, n_train=0, n_eval=32)[2]) <= 0.05
    )  # one task does not solve another
