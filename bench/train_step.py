"""Cost of one training step: Share continual adaptation (frozen basis, trainable coefficients
+ φ temporary directions per side + the task head) against an ordinary PEFT LoRA step, on the
same MiniLM classifier, batch and rank.

Share forms the rank-p factors B̂ = βE_B + β_tmp E_B,tmp and Â once per layer per step and
never materialises ΔW, so its step should cost what a LoRA step costs (target ≤ 1.1×). Both
models are private copies of the same base (share_core.continual.load_classifier); steps are
interleaved (Share, PEFT, PEFT, Share, …) after a warm-up and the medians are compared.
"""

from __future__ import annotations

import time

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from share_core.continual import CLASSIFIER_HEADS, CLASSIFIER_TARGETS, MINILM_ID, load_classifier
from share_core.model import ShareModel, pick_device
from share_core.subspace import KPolicy

from .common import Target, environment, fmt, md_table, parse_args, synthetic_adapters, time_interleaved, write_report

RANK, ALPHA, K, PHI, INIT_ADAPTERS = 8, 16.0, 32, 2, 4


def make_batch(tokenizer, batch: int, length: int, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    """input_ids/attention_mask (batch×length) of ordinary vocabulary tokens, labels (batch,)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, tokenizer.vocab_size, (batch, length), generator=g)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device), "labels": torch.randint(0, 2, (batch,), generator=g).to(device)}


def share_contender(device: torch.device) -> tuple[nn.Module, list[nn.Parameter], dict]:
    """A ShareModel whose basis (k = 32 per side) was built from 4 r = 8 adapters, with a new
    task open: its trainable parameters are the coefficients, the φ directions and the head."""
    model, _ = load_classifier(device=device)
    adapters = synthetic_adapters(model, INIT_ADAPTERS, targets=CLASSIFIER_TARGETS, heads=CLASSIFIER_HEADS, base_model_id=MINILM_ID, rank=RANK, lora_alpha=ALPHA)
    share = ShareModel.from_adapters(model, adapters, base_model_id=MINILM_ID, policy=KPolicy(k_max=K), phi=PHI)
    params = share.begin_task("bench", rank=RANK, scale=ALPHA / RANK, num_labels=2, seed=0)
    ks = sorted({(v["k_B"], v["k_A"]) for v in share.state.layer_table().values()})
    return share, params, {"k": ks}


def peft_contender(device: torch.device) -> tuple[nn.Module, list[nn.Parameter]]:
    """PEFT LoRA r = 8 on query/value with the classifier in modules_to_save (no dropout: Share has none)."""
    model, _ = load_classifier(device=device)
    cfg = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=CLASSIFIER_TARGETS, modules_to_save=CLASSIFIER_HEADS, lora_dropout=0.0)
    pm = get_peft_model(model, cfg)
    return pm, [p for p in pm.parameters() if p.requires_grad]


def train_step(model: nn.Module, opt: torch.optim.Optimizer, batch: dict) -> None:
    """Forward, cross-entropy, backward, AdamW step: what share_core.train.fit does per step."""
    model.train()
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
    args = parse_args(__doc__.split("\n")[0], argv)
    t0 = time.perf_counter()
    device = pick_device()
    env = environment(device)
    batch_size, length, repeats, warmup = (4, 16, 3, 1) if args.quick else (16, 32, 15, 3)
    share, share_params, info = share_contender(device)
    peft_model, peft_params = peft_contender(device)
    _, tok = load_classifier()
    batch = make_batch(tok, batch_size, length, device)
    opts = {"share": torch.optim.AdamW(share_params, lr=1e-3), "peft": torch.optim.AdamW(peft_params, lr=1e-3)}
    train = time_interleaved({"share": lambda: train_step(share, opts["share"], batch), "peft": lambda: train_step(peft_model, opts["peft"], batch)}, repeats, warmup)
    fwd = time_interleaved({"share": lambda: forward_only(share, batch), "peft": lambda: forward_only(peft_model, batch)}, repeats, warmup)
    n_share, n_peft = sum(p.numel() for p in share_params), sum(p.numel() for p in peft_params)
    r_train, r_fwd = train["share"].median / train["peft"].median, fwd["share"].median / fwd["peft"].median
    table = md_table(
        ["step", "Share (ms)", "PEFT LoRA (ms)", "Share / PEFT", "Share p25–p75 (ms)", "PEFT p25–p75 (ms)"],
        [[name, fmt(t["share"].median * 1e3), fmt(t["peft"].median * 1e3), f"{t['share'].median / t['peft'].median:.3f}×",
          f"{fmt(t['share'].p25 * 1e3)}–{fmt(t['share'].p75 * 1e3)}", f"{fmt(t['peft'].p25 * 1e3)}–{fmt(t['peft'].p75 * 1e3)}"]
         for name, t in (("forward + backward + AdamW", train), ("forward only (no grad)", fwd))],
    )
    params = md_table(["", "Share", "PEFT LoRA"], [["trainable parameters (incl. head)", f"{n_share:,}", f"{n_peft:,}"]])
    targets = [Target("Share training step ≤ 1.1× a PEFT LoRA step", r_train <= 1.1, f"{r_train:.3f}× (medians {fmt(train['share'].median * 1e3)} vs {fmt(train['peft'].median * 1e3)} ms)"),
               Target("Share forward ≤ 1.1× a PEFT LoRA forward", r_fwd <= 1.1, f"{r_fwd:.3f}×")]
    intro = (f"MiniLM (all-MiniLM-L6-v2, 6 layers, hidden 384) with a 2-label head; LoRA targets {CLASSIFIER_TARGETS}, r = {RANK}, lora_alpha = {ALPHA:g}; "
             f"Share basis k = {K} per side built from {INIT_ADAPTERS} synthetic r = {RANK} adapters (k_B, k_A per layer: {info['k']}), φ = {PHI}. "
             f"Same batch {batch_size} × {length} tokens for both; {repeats} interleaved repeats after {warmup} warm-up(s); medians.")
    results = {"batch": [batch_size, length], "repeats": repeats, "train": train, "forward": fwd, "ratio_train": r_train, "ratio_forward": r_fwd,
               "trainable_share": n_share, "trainable_peft": n_peft, "k": info["k"]}
    write_report(args.out, "train_step", "Training step: Share against PEFT LoRA", intro, [table, params], targets, results, env, time.perf_counter() - t0, args.quick)


if __name__ == "__main__":
    main()
