"""Synthetic adapter landings with the structure Share assumes: every task's LoRA update lives
in one shared `dim`-dimensional subspace per layer and side (B_j = U_B·G_j, A_jᵀ = U_A·H_j).

Used to grow a workspace to hundreds of tasks quickly (tests, `bench.scale`) without training:
each landing is a real PEFT LoRA directory (written by `peft_io.write_adapter`) plus task.yaml
and eval.jsonl taken from a generated text task, so it goes through the same validation,
absorb and evaluation as an adapter trained elsewhere. With dim ≤ k_max the subspace holds
every task exactly (up to float32 rounding), so a merge moves no old task: the regime in
which a landing's cost must not depend on the history.

`tiny_causal_lm` writes a tiny random causal LM (Llama or GPT-2) with a word-level tokenizer
over the instruction tasks' vocabulary (`tasks.INSTRUCTION_VOCABULARY`) as a Hugging Face model
directory, built locally (no download): the base model of causal-LM tests and demos, on which
a rank-8 LoRA learns each generated instruction task in 150 CPU steps (a few seconds).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from torch import nn
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, PreTrainedTokenizerFast

from .base import head_tensors, last_linear
from .layer import in_out_features
from .model import is_target
from .peft_io import LoraAdapter, write_adapter
from .taskdata import EVAL_FILE, SPEC_FILE, read_examples, read_task_spec
from .tasks import INSTRUCTION_VOCABULARY

SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>")  # ids 0-3 of the tiny causal LM's tokenizer
# Weights N(0, 1/√hidden) and token embeddings (tied with the LM head) N(0, 0.5): with the
# usual 0.02 a frozen head's logits stay below ~1.5 whatever a LoRA does, and with embeddings
# of std ≥ 1 the untrained model's strong "repeat the current word" prior stops a LoRA from
# learning to copy words from elsewhere in the prompt within 150 steps.
TINY_CAUSAL_LM = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=128,
    max_position_embeddings=64,
    initializer_range=0.125,
)
TINY_EMBED_STD = 0.5


def _orthonormal(m: int, k: int, g: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))[0]


def shared_subspace_adapters(
    model: nn.Module,
    names: list[str],
    num_labels: int,
    *,
    targets: list[str],
    heads: list[str],
    base_model_id: str,
    rank: int = 8,
    dim: int = 16,
    scale: float = 2.0,
    seed: int = 0,
    first: int = 0,
    private: float = 0.0,
) -> list[LoraAdapter]:
    """One LoRA per name on `model`'s `targets`, all inside the same dim-dim subspaces (fixed by
    `seed`); task i (counting from `first`) draws its coefficients from seed + i, so adapters
    made in separate calls are the same as in one call. Heads: the model's head with a fresh
    last Linear of `num_labels` outputs (std 1: confident, well-separated predictions).

    private > 0: trained-like adapters — each task's factors also get a component of its own
    outside the shared subspace (relative size `private`, random directions of the full
    space), so the union of many tasks needs more than any k_max and every merge truncates."""
    layers = {
        name: in_out_features(mod)
        for name, mod in model.named_modules()
        if is_target(name, targets) and isinstance(mod, nn.Linear)
    }
    g = torch.Generator().manual_seed(seed)
    bases = {name: (_orthonormal(n, dim, g), _orthonormal(d, dim, g)) for name, (d, n) in sorted(layers.items())}
    base_heads = head_tensors(model, heads)
    last = last_linear(model, heads)
    out = []
    for i, name in enumerate(names, start=first):
        gi = torch.Generator().manual_seed(seed * 1_000_003 + i + 1)
        factors = {}
        for layer, (u_b, u_a) in bases.items():
            b = u_b @ torch.randn(dim, rank, generator=gi, dtype=torch.float64) * (0.05 / rank**0.5)
            a = u_a @ torch.randn(dim, rank, generator=gi, dtype=torch.float64) * (1.0 / rank**0.5)
            if private:  # norms: ‖u·G‖ ≈ √(dim·rank)·σ, a random m×rank block ≈ √(m·rank)·σ, so scale by √(dim/m)
                n_b, n_a = u_b.shape[0], u_a.shape[0]
                b = b + torch.randn(n_b, rank, generator=gi, dtype=torch.float64) * (
                    private * 0.05 / rank**0.5 * (dim / n_b) ** 0.5
                )
                a = a + torch.randn(n_a, rank, generator=gi, dtype=torch.float64) * (
                    private * 1.0 / rank**0.5 * (dim / n_a) ** 0.5
                )
            factors[layer] = (b.float(), a.T.float().contiguous())
        h = dict(base_heads)
        d_in = h[f"{last}.weight"].shape[1]
        h[f"{last}.weight"] = torch.randn(num_labels, d_in, generator=gi)
        if f"{last}.bias" in h:
            h[f"{last}.bias"] = torch.zeros(num_labels)
        out.append(
            LoraAdapter(
                name=name,
                rank=rank,
                lora_alpha=scale * rank,
                scale=scale,
                target_modules=list(targets),
                factors=factors,
                heads=h,
                modules_to_save=list(heads),
                base_model_name=base_model_id,
            )
        )
    return out


def write_landing(root: Path, adapter: LoraAdapter, template: Path, eval_rows: int | None = None) -> Path:
    """<root>/<adapter.name>/: the PEFT LoRA + task.yaml and eval.jsonl of the generated text
    task at `template`, renamed to the adapter (its first `eval_rows` rows); task.yaml last."""
    out = write_adapter(Path(root) / adapter.name, adapter)
    spec = read_task_spec(template / SPEC_FILE)
    rows = read_examples(template / EVAL_FILE, spec)[:eval_rows]
    (out / EVAL_FILE).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    (out / SPEC_FILE).write_text(
        yaml.safe_dump({**spec.to_yaml_dict(), "name": adapter.name}, sort_keys=False), encoding="utf-8"
    )
    return out


def word_tokenizer(vocabulary: list[str]):
    """A `transformers` fast tokenizer over whole words: ids 0-3 are <pad> <unk> <s> </s>, then
    `vocabulary` in order; text splits like r"\\w+|[^\\w\\s]+" ("x:" → "x" ":"), every encoding
    starts with <s> (no </s>: a prompt is continued), and decoding joins the words with spaces."""
    vocab = {w: i for i, w in enumerate([*SPECIAL_TOKENS, *(w for w in vocabulary if w not in SPECIAL_TOKENS)])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # no word starts with "##": joins with " "
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="right",
        model_max_length=TINY_CAUSAL_LM["max_position_embeddings"],
    )


def tiny_causal_lm(
    path: Path, arch: str = "llama", seed: int = 0, *, embed_std: float = TINY_EMBED_STD, **overrides
) -> Path:
    """Write a tiny random causal LM ("llama" or "gpt2" of TINY_CAUSAL_LM's size, input and
    output embeddings tied, of std `embed_std`) and its word-level tokenizer (`word_tokenizer`
    over `INSTRUCTION_VOCABULARY`) to `path`, loadable offline with AutoModelForCausalLM /
    AutoTokenizer.from_pretrained(path); the config's bos/eos/pad ids are the tokenizer's.
    Weights in safetensors, drawn from `seed` without touching the global torch RNG: the same
    seed gives byte-identical files. `overrides` replace fields of the model config."""
    path = Path(path)
    tok = word_tokenizer(INSTRUCTION_VOCABULARY)
    ids = dict(
        vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    t = TINY_CAUSAL_LM
    if arch == "llama":
        config = LlamaConfig(
            **{**t, "num_key_value_heads": t["num_attention_heads"], "tie_word_embeddings": True, **ids, **overrides}
        )
    elif arch == "gpt2":
        gpt2 = dict(
            n_embd=t["hidden_size"],
            n_layer=t["num_hidden_layers"],
            n_head=t["num_attention_heads"],
            n_inner=t["intermediate_size"],
            n_positions=t["max_position_embeddings"],
            initializer_range=t["initializer_range"],
        )
        config = GPT2Config(**{**gpt2, **ids, **overrides})
    else:
        raise ValueError(f"unknown arch {arch!r}; expected 'llama' or 'gpt2'")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # N(0, initializer_range) → N(0, embed_std); the tied head follows
        model.get_input_embeddings().weight.mul_(embed_std / config.initializer_range)
    model.generation_config.pad_token_id = tok.pad_token_id
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path
