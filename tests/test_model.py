"""ShareModel on a tiny BERT with real PEFT adapters: init, inference modes, export, training
and merging, save/load, and bad inputs (clear errors, no state change)."""

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file

from share_core import state as st
from share_core.model import ShareModel, base_model_hash
from share_core.peft_io import AdapterError, read_adapter
from share_core.subspace import KPolicy, relative_error
from share_core.taskdata import TaskData, TaskSpec
from share_core.train import TrainConfig, evaluate, finetune_task, fit

from .conftest import save_peft_adapter, tiny_bert


def share_from(paths, k_max=32, **kw):
    return ShareModel.from_adapters(
        tiny_bert(), [read_adapter(p) for p in paths], base_model_id="tiny-bert", policy=KPolicy(k_max=k_max), **kw
    )


def logits(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits


def peft_logits(path, x):
    return logits(PeftModel.from_pretrained(tiny_bert(), str(path)).eval(), x)


def test_init_reproduces_every_adapter_exactly(adapters_dir, tokens):
    share = share_from(adapters_dir)
    assert all(v["k_B"] == 12 and v["k_A"] == 12 for v in share.state.layer_table().values())  # rank = 3 × r
    for path in adapters_dir:
        share.activate(path.name)
        assert torch.allclose(logits(share, tokens), peft_logits(path, tokens), atol=1e-5)


def test_truncated_init_error_matches_the_reported_error(adapters_dir):
    share = share_from(adapters_dir, k_max=5)
    full = share_from(adapters_dir)
    for i, t in enumerate(share.state.task_names):
        worst = max(
            relative_error(full.layers[ln].delta_weight(i), share.layers[ln].delta_weight(i)) for ln in share.layers
        )
        assert worst > 0.05  # truncation really loses something here
        assert abs(worst - share.last_errors[t]) < 1e-5


@pytest.mark.parametrize("alpha", [8, 20])
def test_export_loads_in_peft_with_identical_logits(tmp_path, tokens, alpha):
    paths = [save_peft_adapter(tmp_path / f"t{j}", seed=j, alpha=alpha) for j in range(2)]
    share = share_from(paths)
    for p in paths:
        out = share.export_task(p.name, tmp_path / "export" / p.name)
        cfg = json.loads((out / "adapter_config.json").read_text())
        assert cfg["r"] == 4 and cfg["lora_alpha"] == alpha and cfg["modules_to_save"] == ["classifier"]
        share.activate(p.name)
        assert torch.allclose(peft_logits(out, tokens), logits(share, tokens), atol=1e-5)
    with pytest.raises(FileExistsError):
        share.export_task(paths[0].name, tmp_path / "export" / paths[0].name)


def test_mixed_task_batch_equals_per_task_forwards(adapters_dir, tokens):
    share = share_from(adapters_dir)
    tasks = ["task0", "task2", "task1", "task0", "task2", "task1"]
    mixed = share.forward_mixed(tasks, input_ids=tokens)
    for i, t in enumerate(tasks):
        share.activate(t)
        assert torch.allclose(mixed[i], logits(share, tokens[i : i + 1])[0], atol=1e-5)


def test_merge_into_base_equals_adapter_forward_and_unmerge_restores(adapters_dir, tokens):
    share = share_from(adapters_dir)
    w0 = {n: layer.base.weight.clone() for n, layer in share.layers.items()}
    share.activate("task1")
    expected = logits(share, tokens)
    share.merge_into_base("task1")
    assert torch.allclose(logits(share, tokens), expected, atol=1e-5)
    with pytest.raises(RuntimeError, match="already merged"):
        share.merge_into_base("task2")
    share.unmerge()
    for n, layer in share.layers.items():
        assert torch.allclose(layer.base.weight, w0[n], atol=1e-6)


def toy_task(name="toy", n=96, seed=0):
    """A token-pattern classification task a tiny BERT can fit: label = which token appears."""
    g = torch.Generator().manual_seed(seed)
    words = ["alpha", "beta", "gamma"]
    rows = []
    for i in range(n):
        y = i % 3
        filler = [str(int(v)) for v in torch.randint(0, 9, (5,), generator=g)]
        rows.append({"text": " ".join(filler[:2] + [words[y]] + filler[2:]), "label": words[y]})
    spec = TaskSpec(name=name, type="sequence-classification", labels=tuple(words))
    return TaskData(spec=spec, train=rows[: 3 * n // 4], eval=rows[3 * n // 4 :], root=None)


class CharTokenizer:
    """A deterministic word-hash tokenizer with the HF call signature (tiny vocab of 100)."""

    def __call__(self, texts, padding=True, truncation=True, max_length=32, return_tensors="pt"):
        ids = [[1] + [2 + (sum(map(ord, w)) % 97) for w in t.split()][: max_length - 1] for t in texts]
        width = max(map(len, ids))
        input_ids = torch.tensor([x + [0] * (width - len(x)) for x in ids])
        return {"input_ids": input_ids, "attention_mask": (input_ids != 0).long()}


def test_trained_task_survives_the_merge(adapters_dir):
    share = share_from(adapters_dir, phi=2)
    task = toy_task()
    tok = CharTokenizer()
    cfg = TrainConfig(steps=60, batch_size=16, lr=1e-2, rank=4, lora_alpha=8, progress=False)
    params = share.begin_task("toy", rank=4, scale=2.0, num_labels=3, seed=0)
    assert all(not p.requires_grad for n, p in share.model.named_parameters() if ".base." in n)
    fit(share, params, tok, task, cfg, "toy")
    x = tok([r["text"] for r in task.eval])["input_ids"]
    trained = logits(share, x)
    before = {
        t: [share.layers[ln].delta_weight(i).clone() for ln in share.layers]
        for i, t in enumerate(share.state.task_names)
    }
    errors = share.finish_task(KPolicy(k_max=64))
    share.activate("toy")
    assert torch.allclose(logits(share, x), trained, atol=1e-4)
    assert errors["toy"] < 1e-5
    for i, t in enumerate(before):  # old tasks unchanged: k grew to hold everything
        for ln, d in zip(share.layers, before[t]):
            assert relative_error(d, share.layers[ln].delta_weight(i)) < 1e-5
    assert evaluate(share, tok, task) > 0.6  # learned something well above chance (1/3)
    # a small k: the merged update's error is exactly what the truncation predicts
    small = share_from(adapters_dir, phi=2)
    params = small.begin_task("toy", rank=4, scale=2.0, num_labels=3, seed=0)
    fit(small, params, tok, task, cfg, "toy")
    want = {
        ln: layer.slot_scale * (lambda b, a: b @ a.T)(*[f.detach() for f in layer.slot_factors()])
        for ln, layer in small.layers.items()
    }
    errs = small.finish_task(KPolicy(k_max=6))
    i = small.state.task_names.index("toy")
    actual = max(relative_error(want[ln], small.layers[ln].delta_weight(i)) for ln in small.layers)
    assert actual > 1e-3 and abs(actual - errs["toy"]) < 1e-4


def test_share_full_finetune_changes_only_that_task(adapters_dir):
    share = share_from(adapters_dir)
    tok = CharTokenizer()
    task = toy_task("task1")
    before = {
        t: share.layers[next(iter(share.layers))].delta_weight(i).clone() for i, t in enumerate(share.state.task_names)
    }
    basis = {ln: b.clone() for ln, (b, _) in share.state.bases.items()}
    finetune_task(share, tok, task, TrainConfig(steps=30, lr=1e-2, progress=False))
    ln = next(iter(share.layers))
    assert relative_error(before["task0"], share.layers[ln].delta_weight(0)) < 1e-7
    assert relative_error(before["task1"], share.layers[ln].delta_weight(1)) > 1e-3
    assert all(torch.equal(basis[k], b) for k, (b, _) in share.state.bases.items())


def test_save_load_roundtrip_and_tamper_detection(adapters_dir, tmp_path, tokens):
    share = share_from(adapters_dir)
    digest = st.save(share.state, tmp_path / "v1")
    loaded = st.load(tmp_path / "v1")
    assert st.read_manifest(tmp_path / "v1").content_hash == digest
    again = ShareModel(tiny_bert(), loaded)
    for t in loaded.task_names:
        share.activate(t)
        again.activate(t)
        assert torch.equal(logits(share, tokens), logits(again, tokens))
    with pytest.raises(FileExistsError):
        st.save(share.state, tmp_path / "v1")
    # a manifest edited by hand no longer matches its hash
    m = json.loads((tmp_path / "v1" / "manifest.json").read_text())
    m["tasks"][0]["scale"] = 99.0
    (tmp_path / "v1" / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(st.VersionError, match="content hash"):
        st.load(tmp_path / "v1")
    # a tensor file changed behind the manifest's back
    st.save(share.state, tmp_path / "v2")
    f = tmp_path / "v2" / "basis.safetensors"
    t = load_file(f)
    t[next(iter(t))][0, 0] += 1
    save_file(t, f)
    with pytest.raises(st.VersionError, match="sha256"):
        st.load(tmp_path / "v2")
    # another base model is refused
    with pytest.raises(ValueError, match="hash"):
        ShareModel(tiny_bert(seed=5), loaded)


def snapshot(share):
    return st.save(share.state, share._snapdir / f"s{len(list(share._snapdir.iterdir()))}")


@pytest.mark.parametrize(
    "make_bad, match",
    [
        (lambda p: save_peft_adapter(p, seed=1, base_name="other-model"), "trained on base model"),
        (lambda p: save_peft_adapter(p, seed=1, targets=("query", "key")), "targets"),
        (
            lambda p: save_peft_adapter(p, seed=1, hidden_size=48, num_attention_heads=2),
            "layer .* factors imply|size mismatch|base layer",
        ),
        ("nan", "NaN"),
        ("pickle", "pickle"),
        ("corrupt", "corrupt"),
    ],
)
def test_bad_adapters_are_rejected_without_changing_the_subspace(adapters_dir, tmp_path, make_bad, match):
    share = share_from(adapters_dir)
    share._snapdir = tmp_path / "snap"
    share._snapdir.mkdir()
    before = snapshot(share)
    bad = tmp_path / "bad"
    if make_bad == "nan":
        save_peft_adapter(bad, seed=1)
        sd = load_file(bad / "adapter_model.safetensors")
        k = next(k for k in sd if "lora_A" in k)
        sd[k][0, 0] = float("nan")
        save_file(sd, bad / "adapter_model.safetensors")
    elif make_bad == "pickle":
        save_peft_adapter(bad, seed=1)
        (bad / "adapter_model.safetensors").rename(bad / "adapter_model.bin")
    elif make_bad == "corrupt":
        save_peft_adapter(bad, seed=1)
        data = (bad / "adapter_model.safetensors").read_bytes()
        (bad / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    else:
        make_bad(bad)
    with pytest.raises((AdapterError, ValueError), match=match):
        share.absorb([read_adapter(bad)])
    assert snapshot(share) == before
    assert share.state.task_names == ["task0", "task1", "task2"]


def test_absorb_is_exact_and_leaves_old_tasks(adapters_dir, tmp_path, tokens):
    share = share_from(adapters_dir[:1])
    share.absorb([read_adapter(p) for p in adapters_dir[1:]])
    for p in adapters_dir:
        share.activate(p.name)
        assert torch.allclose(logits(share, tokens), peft_logits(p, tokens), atol=1e-5)
    with pytest.raises(AdapterError, match="already exist"):
        share.absorb([read_adapter(adapters_dir[0])])


def test_base_hash_ignores_heads_only():
    a, b = tiny_bert(), tiny_bert()
    b.classifier.weight.data += 1
    assert base_model_hash(a, ["classifier"]) == base_model_hash(b, ["classifier"])
    b.bert.encoder.layer[0].attention.self.query.weight.data += 1
    assert base_model_hash(a, ["classifier"]) != base_model_hash(b, ["classifier"])


def test_mixed_batch_with_a_head_of_several_modules_equals_per_task_forwards():
    """DistilBERT's head is pre_classifier + classifier: a mixed batch must run all of it per task."""
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    from share_core.synthetic import shared_subspace_adapters

    torch.manual_seed(0)
    model = DistilBertForSequenceClassification(
        DistilBertConfig(
            vocab_size=100, dim=32, n_layers=2, n_heads=2, hidden_dim=64, max_position_embeddings=32, num_labels=3
        )
    ).eval()
    heads = ["pre_classifier", "classifier"]
    adapters = shared_subspace_adapters(
        model, ["a", "b"], 3, targets=["q_lin", "v_lin"], heads=heads, base_model_id="tiny-distilbert", rank=2, dim=4
    )
    for a, shift in zip(adapters, (0.5, -0.5)):  # heads that differ per task in both modules
        for k in a.heads:
            a.heads[k] = a.heads[k] + shift
    share = ShareModel.from_adapters(model, adapters, base_model_id="tiny-distilbert", policy=KPolicy(k_max=8))
    tokens = torch.randint(0, 100, (4, 7), generator=torch.Generator().manual_seed(1))
    tasks = ["a", "b", "b", "a"]
    mixed = share.forward_mixed(tasks, input_ids=tokens)
    for i, t in enumerate(tasks):
        share.activate(t)
        assert mixed[i].shape == (3,) and torch.allclose(mixed[i], logits(share, tokens[i : i + 1])[0], atol=1e-5)
