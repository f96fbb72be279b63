"""Cost of one training step: Share continual adaptation (frozen basis, trainable coefficients
+ φ temporary directions per side, + the task head on a classifier) against an ordinary PEFT
LoRA step, on the same base model, batch and rank.

Share forms the rank-p factors B̂ = βE_B + β_tmp E_B,tmp and Â once per layer per step and
never materialises ΔW, so its step should cost what a LoRA step costs (target ≤ 1.1×). Both
models are private copies of the same base (bench.models.load_model: the MiniLM classifier by
default, or with --model a randomly initialised Llama-shaped causal LM trained with the LM loss
on random tokens); steps are interleaved (Share, PEFT, PEFT, Share, …) after a warm-up and the
medians are compared. --device picks where both run.
"""

from __future__ import annotations

import time

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from share_core.model import ShareModel
from share_core.subspace import KPolicy

from .common import Target, environment, fmt, md_table, parse_args, time_interleaved, write_report
from .models import MODELS, describe, load_model, model_id, random_adapters, vocab_size

RANK, ALPHA, K, PHI, INIT_ADAPTERS = 8, 16.0, 32, 2, 4
# (batch, tokens, repeats, warm-ups) by (quick?, model kind)
SIZES = {
    (True, "classifier"): (4, 16, 3, 1),
    (False, "classifier"): (16, 32, 15, 3),
    (True, "causal-lm"): (2, 16, 3, 1),
    (False, "causal-lm"): (8, 256, 10, 3),
}


def make_batch(
    vocab: int, batch: int, length: int, device: torch.device, seed: int = 0, causal: bool = False
) -> dict[str, torch.Tensor]:
    """input_ids/attention_mask (batch×length) of ordinary vocabulary tokens (ids ≥ 1000 in a
    large vocabulary: no special tokens); labels: (batch,) in {0, 1} for a classifier, the input
    ids for a causal LM (the model shifts them)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000 if vocab > 2000 else 0, vocab, (batch, length), generator=g)
    labels = ids if causal else torch.randint(0, 2, (batch,), generator=g)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device), "labels": labels.to(device)}


def share_contender(name: str, device: torch.device) -> tuple[nn.Module, list[nn.Parameter], dict]:
    """A ShareModel whose basis (k = 32 per side) was built from 4 r = 8 adapters, with a new
    task open: its trainable parameters are the coefficients, the φ directions and the head (if any).
    info: k per layer, the model kind, its vocabulary and a sentence describing it."""
    bm = load_model(name, device)
    info = {"kind": bm.kind, "vocab": vocab_size(bm), "model": describe(name, bm), "targets": bm.targets}
    adapters = random_adapters(bm, INIT_ADAPTERS, base_model_id=model_id(name), rank=RANK, lora_alpha=ALPHA)
    share = ShareModel.from_adapters(bm.model, adapters, base_model_id=model_id(name), policy=KPolicy(k_max=K), phi=PHI)
    params = share.begin_task("bench", rank=RANK, scale=ALPHA / RANK, num_labels=2 if bm.heads else None, seed=0)
    info["k"] = sorted({(v["k_B"], v["k_A"]) for v in share.state.layer_table().values()})
    info["layers"] = len(share.layers)
    return share, params, info


def peft_contender(name: str, device: torch.device) -> tuple[nn.Module, list[nn.Parameter]]:
    """PEFT LoRA r = 8 on the model's targets with the head (if any) in modules_to_save (no dropout: Share has none)."""
    bm = load_model(name, device)
    cfg = LoraConfig(
        r=RANK, lora_alpha=ALPHA, target_modules=bm.targets, modules_to_save=bm.heads or None, lora_dropout=0.0
    )
    pm = get_peft_model(bm.model, cfg)
    return pm, [p for p in pm.parameters() if p.requires_grad]


def train_step(model: nn.Module, opt: torch.optim.Optimizer, batch: dict, causal: bool = False) -> None:
    """Forward, loss (cross-entropy over the labels, or the causal-LM loss), backward, AdamW
    step: what share_core.train.fit does per step."""
    model.train()
    if causal:
        loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    else:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = nn.functional.cross_entropy(logits, batch["labels"])
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


@torch.no_grad()
def forward_only(model: nn.Module, batch: dict) -> None:
    model.eval()
    model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(__doc__.split("\n")[0], argv, models=MODELS)
    t0 = time.perf_counter()
    device = args.device
    env = environment(device)
    share, share_params, info = share_contender(args.model, device)
    peft_model, peft_params = peft_contender(args.model, device)
    causal = info["kind"] == "causal-lm"
    batch_size, length, repeats, warmup = SIZES[(args.quick, info["kind"])]
    batch = make_batch(info["vocab"], batch_size, length, device, causal=causal)
    opts = {"share": torch.optim.AdamW(share_params, lr=1e-3), "peft": torch.optim.AdamW(peft_params, lr=1e-3)}
    train = time_interleaved(
        {
            "share": lambda: train_step(share, opts["share"], batch, causal),
            "peft": lambda: train_step(peft_model, opts["peft"], batch, causal),
        },
        repeats,
        warmup,
    )
    fwd = time_interleaved(
        {"share": lambda: forward_only(share, batch), "peft": lambda: forward_only(peft_model, batch)}, repeats, warmup
    )
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    n_share, n_peft = sum(p.numel() for p in share_params), sum(p.numel() for p in peft_params)
    r_train, r_fwd = train["share"].median / train["peft"].median, fwd["share"].median / fwd["peft"].median
    table = md_table(
        ["step", "Share (ms)", "PEFT LoRA (ms)", "Share / PEFT", "Share p25–p75 (ms)", "PEFT p25–p75 (ms)"],
        [
            [
                name,
                fmt(t["share"].median * 1e3),
                fmt(t["peft"].median * 1e3),
                f"{t['share'].median / t['peft'].median:.3f}×",
                f"{fmt(t['share'].p25 * 1e3)}–{fmt(t['share'].p75 * 1e3)}",
                f"{fmt(t['peft'].p25 * 1e3)}–{fmt(t['peft'].p75 * 1e3)}",
            ]
            for name, t in (("forward + backward + AdamW", train), ("forward only (no grad)", fwd))
        ],
    )
    params = md_table(
        ["", "Share", "PEFT LoRA"],
        [[f"trainable parameters{' (incl. head)' if not causal else ''}", f"{n_share:,}", f"{n_peft:,}"]],
    )
    targets = [
        Target(
            "Share training step ≤ 1.1× a PEFT LoRA step",
            r_train <= 1.1,
            f"{r_train:.3f}× (medians {fmt(train['share'].median * 1e3)} vs {fmt(train['peft'].median * 1e3)} ms)",
        ),
        Target("Share forward ≤ 1.1× a PEFT LoRA forward", r_fwd <= 1.1, f"{r_fwd:.3f}×"),
    ]
    intro = (
        f"{info['model']}; LoRA targets {info['targets']} ({info['layers']} modules), r = {RANK}, lora_alpha = "
        f"{ALPHA:g}; "
        f"Share basis k = {K} per side built from {INIT_ADAPTERS} synthetic r = {RANK} adapters (k_B, k_A per layer: "
        f"{info['k']}), φ = {PHI}. "
        f"Same batch {batch_size} × {length} tokens for "
        f"both{' (loss: next-token cross-entropy over the vocabulary)' if causal else ''}; "
        f"device {device}; {repeats} interleaved repeats after {warmup} warm-up(s); medians."
        + (f" Peak device memory over both contenders: {peak / 2**30:.2f} GiB." if peak is not None else "")
    )
    results = {
        "model": args.model,
        "device": str(device),
        "batch": [batch_size, length],
        "repeats": repeats,
        "train": train,
        "forward": fwd,
        "ratio_train": r_train,
        "ratio_forward": r_fwd,
        "trainable_share": n_share,
        "trainable_peft": n_peft,
        "k": info["k"],
        "peak_device_bytes": peak,
    }
    write_report(
        args.out,
        "train_step",
        "Training step: Share against PEFT LoRA",
        intro,
        [table, params],
        targets,
        results,
        env,
        time.perf_counter() - t0,
        args.quick,
    )


if __name__ == "__main__":
    main()
