"""Serving many tasks from one model: a batch whose examples belong to 16 different tasks,
through one shared subspace (ShareModel.forward_mixed) against PEFT's mixed-adapter batch
(a PeftModel with 16 LoRA adapters loaded, `model(..., adapter_names=[...])`); and the memory
the adapter state of 16 and 100 tasks occupies in each.

Share computes αᵀx and β(·) once for the whole batch and only a k×p product per task; PEFT
splits the batch per adapter in every adapted layer. Both models serve the *same* updates: the
PEFT adapters are Share's tasks exported with ShareModel.export_task and loaded by PEFT
itself, and the benchmark checks that their logits agree. The adapters are synthetic (random
LoRA factors in a shared subspace, random heads), since serving cost does not depend on what
was learned.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
from peft import PeftModel

from share_core.continual import CLASSIFIER_HEADS, CLASSIFIER_TARGETS, MINILM_ID, load_classifier
from share_core.metrics import accounting
from share_core.model import ShareModel, pick_device
from share_core.subspace import KPolicy

from .common import Target, environment, fmt, md_table, parse_args, rss_bytes, synthetic_adapters, tensor_bytes, time_interleaved, write_report
from .train_step import make_batch

RANK, ALPHA, K = 8, 16.0, 32
MB = 1024 * 1024


def build_share(tasks: int, device: torch.device) -> tuple[ShareModel, int]:
    """ShareModel holding `tasks` synthetic tasks (k = 32); and the RSS its construction added."""
    model, _ = load_classifier(device=device)
    adapters = synthetic_adapters(model, tasks, targets=CLASSIFIER_TARGETS, heads=CLASSIFIER_HEADS, base_model_id=MINILM_ID, rank=RANK, lora_alpha=ALPHA, seed=tasks)
    before = rss_bytes()
    share = ShareModel.from_adapters(model, adapters, base_model_id=MINILM_ID, policy=KPolicy(k_max=K))
    return share, rss_bytes() - before  # the input adapters are still alive: not counted


def build_peft(share: ShareModel, device: torch.device, tmp: Path) -> tuple[PeftModel, int]:
    """A PeftModel with every Share task loaded as its own LoRA adapter (exported, then loaded by
    PEFT from disk); and the RSS the loading added."""
    names = share.state.task_names
    dirs = [share.export_task(name, tmp / name) for name in names]
    model, _ = load_classifier(device=device)
    before = rss_bytes()
    pm = PeftModel.from_pretrained(model, str(dirs[0]), adapter_name=names[0])
    for name, d in zip(names[1:], dirs[1:]):
        pm.load_adapter(str(d), adapter_name=name)
    pm.eval()
    return pm, rss_bytes() - before


def peft_adapter_bytes(pm: PeftModel) -> int:
    """Bytes of PEFT's per-adapter tensors: LoRA factors and each adapter's copy of the head."""
    return tensor_bytes(p for n, p in pm.named_parameters() if "lora_" in n or "modules_to_save" in n)


def share_resident_bytes(share: ShareModel) -> int:
    """Bytes of the adapter state a ShareModel keeps in memory: its SubspaceState (bases,
    coefficients, heads) and what the ShareLinear layers hold for inference (bases, stacked
    coefficients), shared storages counted once."""
    state = share.state
    tensors = [t for b, a in state.bases.values() for t in (b, a)]
    tensors += [t for task in state.tasks for eb, ea in task.coefs.values() for t in (eb, ea)]
    tensors += [t for task in state.tasks for t in task.heads.values()]
    tensors += [b for layer in share.layers.values() for b in (layer.beta, layer.alpha, layer.coef_b, layer.coef_a, layer.scales)]
    return tensor_bytes(tensors)


def mixed_tasks(names: list[str], batch: int, seed: int = 0) -> list[str]:
    """`batch` task names, every task equally often, in a fixed shuffled order."""
    order = torch.randperm(batch, generator=torch.Generator().manual_seed(seed)).tolist()
    return [names[i % len(names)] for i in order]


@torch.no_grad()
def agreement(share: ShareModel, pm: PeftModel, batch: dict, tasks: list[str]) -> float:
    """Largest |logit difference| between Share and PEFT on a mixed batch."""
    a = torch.stack(share.forward_mixed(tasks, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]))
    b = pm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], adapter_names=tasks).logits
    return float((a - b).abs().max())


@torch.no_grad()
def _no_grad(model, **inputs):
    return model(**inputs).logits


def throughput(share: ShareModel, pm: PeftModel, base, tok, batch_size: int, length: int, repeats: int, device) -> dict:
    batch = make_batch(tok, batch_size, length, device)
    tasks = mixed_tasks(share.state.task_names, batch_size)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    fns = {
        "share": lambda: share.forward_mixed(tasks, input_ids=ids, attention_mask=mask),
        "peft": lambda: _no_grad(pm, input_ids=ids, attention_mask=mask, adapter_names=tasks),
        "base": lambda: _no_grad(base, input_ids=ids, attention_mask=mask),
    }
    t = time_interleaved(fns, repeats, warmup=2)
    return {"batch": [batch_size, length], "time": t, "max_abs_diff": agreement(share, pm, batch, tasks),
            "ratio": t["peft"].median / t["share"].median}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(__doc__.split("\n")[0], argv)
    t0 = time.perf_counter()
    device = pick_device()
    env = environment(device)
    tasks, memory_tasks, shapes, repeats = (4, (4, 8), [(4, 16)], 3) if args.quick else (16, (16, 100), [(16, 32), (64, 32)], 10)
    base, tok = load_classifier(device=device)
    memory, runs = {}, []
    with tempfile.TemporaryDirectory() as tmp:
        warm, _ = build_share(2, device)  # first use of linalg, safetensors and PEFT loading grows RSS once: not the adapters'
        build_peft(warm, device, Path(tmp) / "warm-up")
        del warm
        for t in memory_tasks:
            share, rss_share = build_share(t, device)
            pm, rss_peft = build_peft(share, device, Path(tmp) / f"T{t}")
            acct = accounting(share.state)
            memory[t] = {"share_stored_bytes": acct["share_bytes"], "share_resident_bytes": share_resident_bytes(share), "peft_bytes": peft_adapter_bytes(pm),
                         "share_rss_delta": rss_share, "peft_rss_delta": rss_peft}
            if t == tasks:
                runs = [throughput(share, pm, base, tok, b, length, repeats, device) for b, length in shapes]
            else:
                memory[t]["max_abs_diff"] = agreement(share, pm, make_batch(tok, 2 * t, 16, device), mixed_tasks(share.state.task_names, 2 * t))
            print(f"T={t}: {memory[t]}", flush=True)
            del share, pm
    t_speed = md_table(
        ["batch (examples × tokens)", "Share mixed (ms)", "PEFT mixed (ms)", "base model, no adapter (ms)", "Share throughput / PEFT", "ceiling: PEFT / base", "Share overhead vs base", "PEFT overhead vs base", "max |Δ logit|"],
        [[f"{r['batch'][0]} × {r['batch'][1]}", fmt(r["time"]["share"].median * 1e3), fmt(r["time"]["peft"].median * 1e3), fmt(r["time"]["base"].median * 1e3),
          f"{r['ratio']:.2f}×", f"{r['time']['peft'].median / r['time']['base'].median:.2f}×", f"{r['time']['share'].median / r['time']['base'].median - 1:+.0%}", f"{r['time']['peft'].median / r['time']['base'].median - 1:+.0%}",
          fmt(r["max_abs_diff"])] for r in runs],
    )
    t_mem = md_table(
        ["tasks", "Share stored: basis + coefficients + heads (MB)", "Share resident: state + layer buffers (MB)", "PEFT resident: LoRA + head copies (MB)",
         "PEFT / Share resident", "RSS growth Share (MB)", "RSS growth PEFT (MB)"],
        [[t, fmt(m["share_stored_bytes"] / MB), fmt(m["share_resident_bytes"] / MB), fmt(m["peft_bytes"] / MB), f"{m['peft_bytes'] / m['share_resident_bytes']:.1f}×",
          fmt(m["share_rss_delta"] / MB), fmt(m["peft_rss_delta"] / MB)] for t, m in memory.items()],
    )
    worst = max([r["max_abs_diff"] for r in runs] + [m.get("max_abs_diff", 0.0) for m in memory.values()])
    targets = [Target(f"mixed batch of {tasks} tasks: Share throughput ≥ 2× PEFT (batch {r['batch'][0]} × {r['batch'][1]})", r["ratio"] >= 2.0, f"{r['ratio']:.2f}×") for r in runs]
    targets.append(Target("Share and PEFT serve the same updates (max |Δ logit| ≤ 1e-4)", worst <= 1e-4, f"max |Δ logit| = {fmt(worst)}"))
    intro = (f"MiniLM classifier, LoRA r = {RANK} on {CLASSIFIER_TARGETS} (12 modules), 2-label head per task; Share k = {K} per side. "
             f"Throughput: one batch mixing {tasks} tasks (each equally often, shuffled), Share `forward_mixed` vs PEFT `adapter_names=`, "
             f"and the bare base model as the floor; {repeats} interleaved repeats, medians, no grad. No adapter method can beat the bare model, so "
             "PEFT / base is the ceiling of the Share / PEFT throughput ratio on this device. Memory: bytes of the stored tensors, "
             "and the process RSS growth while the adapter state is built/loaded (after gc and malloc_trim; includes allocator and loader overhead, so indicative).")
    results = {"throughput": runs, "memory": memory}
    write_report(args.out, "serving", "Serving: mixed-task batches and adapter memory", intro, [t_speed, t_mem], targets, results, env, time.perf_counter() - t0, args.quick)


if __name__ == "__main__":
    main()
