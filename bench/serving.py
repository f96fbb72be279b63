"""Serving many tasks from one model: a batch whose examples belong to 16 different tasks,
through one shared subspace (ShareModel.forward_mixed) against PEFT's mixed-adapter batch
(a PeftModel with 16 LoRA adapters loaded, `model(..., adapter_names=[...])`); and the memory
the adapter state of 16 and 100 tasks occupies in each.

Share computes αᵀx and β(·) once for the whole batch and only a k×p product per task; PEFT
splits the batch per adapter in every adapted layer. Both models serve the *same* updates: the
PEFT adapters are Share's tasks exported with ShareModel.export_task and loaded by PEFT
itself, and the benchmark checks that their logits agree. The adapters are synthetic (random
LoRA factors in a shared subspace, random heads), since serving cost does not depend on what
was learned. --model picks the base (the MiniLM classifier by default, or a randomly initialised
Llama-shaped causal LM: no heads, per-task logits over the vocabulary), --device where it runs.

On MiniLM it also serves text through the MLflow pyfunc model of a version (pipelines.pyfunc:
`mlflow.pyfunc.load_model(...).predict(DataFrame)`, rows of different tasks) against the same
mixed-task predict in process (tokenise, one forward, softmax) and PEFT's multi-adapter batch
on the same texts: the overhead of the MLflow layer.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
from peft import PeftModel

from share_core.metrics import accounting
from share_core.model import ShareModel
from share_core.subspace import KPolicy

from .common import (
    Target,
    environment,
    fmt,
    md_table,
    minilm_layers,
    parse_args,
    rss_bytes,
    tensor_bytes,
    time_interleaved,
    write_report,
)
from .models import MODELS, describe, load_model, model_id, random_adapters, vocab_size
from .train_step import make_batch

RANK, ALPHA, K = 8, 16.0, 32
MB = 1024 * 1024
# (tasks in the throughput batch, task counts for memory, (batch, tokens) shapes, repeats) by (quick?, model kind)
SIZES = {
    (True, "classifier"): (4, (4, 8), [(4, 16)], 3),
    (False, "classifier"): (16, (16, 100), [(16, 32), (64, 32)], 10),
    (True, "causal-lm"): (4, (4, 8), [(4, 16)], 3),
    (False, "causal-lm"): (16, (16, 100), [(16, 128), (64, 128)], 10),
}


def device_bytes(device: torch.device) -> int:
    """Bytes allocated by torch on a CUDA device (0 on CPU)."""
    if device.type != "cuda":
        return 0
    torch.cuda.synchronize(device)
    return torch.cuda.memory_allocated(device)


def build_share(name: str, tasks: int, device: torch.device) -> tuple[ShareModel, int, int]:
    """ShareModel holding `tasks` synthetic tasks (k = 32); and the RSS and the device memory its
    construction added."""
    bm = load_model(name, device)
    adapters = random_adapters(bm, tasks, base_model_id=model_id(name), rank=RANK, lora_alpha=ALPHA, seed=tasks)
    before, dev_before = rss_bytes(), device_bytes(device)
    share = ShareModel.from_adapters(bm.model, adapters, base_model_id=model_id(name), policy=KPolicy(k_max=K))
    return (
        share,
        rss_bytes() - before,
        device_bytes(device) - dev_before,
    )  # the input adapters are still alive: not counted


def build_peft(name: str, share: ShareModel, device: torch.device, tmp: Path) -> tuple[PeftModel, int, int]:
    """A PeftModel with every Share task loaded as its own LoRA adapter (exported, then loaded by
    PEFT from disk); and the RSS and the device memory the loading added."""
    names = share.state.task_names
    dirs = [share.export_task(task, tmp / task) for task in names]
    model = load_model(name, device).model
    before, dev_before = rss_bytes(), device_bytes(device)
    pm = PeftModel.from_pretrained(model, str(dirs[0]), adapter_name=names[0])
    for task, d in zip(names[1:], dirs[1:]):
        pm.load_adapter(str(d), adapter_name=task)
    pm.eval()
    return pm, rss_bytes() - before, device_bytes(device) - dev_before


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
    tensors += [
        b
        for layer in share.layers.values()
        for b in (layer.beta, layer.alpha, layer.coef_b, layer.coef_a, layer.scales)
    ]
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


def throughput(
    share: ShareModel, pm: PeftModel, base, vocab: int, batch_size: int, length: int, repeats: int, device
) -> dict:
    batch = make_batch(vocab, batch_size, length, device)
    tasks = mixed_tasks(share.state.task_names, batch_size)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    fns = {
        "share": lambda: share.forward_mixed(tasks, input_ids=ids, attention_mask=mask),
        "peft": lambda: _no_grad(pm, input_ids=ids, attention_mask=mask, adapter_names=tasks),
        "base": lambda: _no_grad(base, input_ids=ids, attention_mask=mask),
    }
    t = time_interleaved(fns, repeats, warmup=2)
    return {
        "batch": [batch_size, length],
        "time": t,
        "max_abs_diff": agreement(share, pm, batch, tasks),
        "ratio": t["peft"].median / t["share"].median,
    }


def pyfunc_path(share: ShareModel, pm: PeftModel, tok, batch_size: int, repeats: int, tmp: Path) -> dict:
    """Mixed-task text requests through the version's MLflow pyfunc model vs the same predict in
    process vs PEFT's adapter_names batch (tokenisation included in all three)."""
    import mlflow.pyfunc
    import pandas as pd

    from pipelines.params import Params, save_params
    from pipelines.pyfunc import write_model
    from pipelines.workspace import Workspace
    from share_core import state as st
    from share_core.tasks import generate_task

    ws = Workspace(tmp / "pyfunc-ws")
    save_params(ws.params_path, Params())
    for t in share.state.tasks:
        t.info.setdefault("labels", [f"label{i}" for i in range(2)])
    st.save(share.state, ws.version_dir("v0001"))
    served = mlflow.pyfunc.load_model(str(write_model(tmp / "pyfunc-model", ws, "v0001")))
    impl = served._model_impl  # the flavor's SubspaceModel: the in-process path without MLflow's layer
    texts = [r["text"] for r in generate_task("sentiment", n_train=batch_size, n_eval=1)[1]]
    tasks = mixed_tasks(share.state.task_names, batch_size)
    df = pd.DataFrame({"task": tasks, "text": texts})
    serving = impl.config["serving"]

    def peft():
        enc = tok(texts, padding=True, truncation=True, max_length=serving["max_length"], return_tensors="pt").to(
            next(pm.parameters()).device
        )
        return _no_grad(
            pm, input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], adapter_names=tasks
        ).softmax(-1)

    fns = {
        "pyfunc": lambda: served.predict(df),
        "in-process": lambda: impl.family.predict(impl.share, impl.tok, tasks, texts, **serving),
        "peft": peft,
    }
    t = time_interleaved(fns, repeats, warmup=2)
    return {
        "batch": batch_size,
        "time": t,
        "overhead": t["pyfunc"].median / t["in-process"].median,
        "vs_peft": t["peft"].median / t["pyfunc"].median,
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(__doc__.split("\n")[0], argv, models=MODELS)
    t0 = time.perf_counter()
    device = args.device
    env = environment(device)
    bm = load_model(args.model, device)
    base, vocab, model_text, n_layers = (
        bm.model,
        vocab_size(bm),
        describe(args.model, bm),
        len(minilm_layers(bm.model, bm.targets)),
    )
    tasks, memory_tasks, shapes, repeats = SIZES[(args.quick, bm.kind)]
    memory, runs, served = {}, [], None
    with tempfile.TemporaryDirectory() as tmp:
        warm, _, _ = build_share(
            args.model, 2, device
        )  # first use of linalg, safetensors and PEFT loading grows RSS once: not the adapters'
        build_peft(args.model, warm, device, Path(tmp) / "warm-up")
        del warm
        for t in memory_tasks:
            share, rss_share, dev_share = build_share(args.model, t, device)
            pm, rss_peft, dev_peft = build_peft(args.model, share, device, Path(tmp) / f"T{t}")
            acct = accounting(share.state)
            memory[t] = {
                "share_stored_bytes": acct["share_bytes"],
                "share_resident_bytes": share_resident_bytes(share),
                "peft_bytes": peft_adapter_bytes(pm),
                "share_rss_delta": rss_share,
                "peft_rss_delta": rss_peft,
                "share_device_delta": dev_share,
                "peft_device_delta": dev_peft,
            }
            if t == tasks:
                runs = [throughput(share, pm, base, vocab, b, length, repeats, device) for b, length in shapes]
                if bm.kind == "classifier":
                    served = pyfunc_path(share, pm, bm.tokenizer, shapes[-1][0], repeats, Path(tmp))
            else:
                memory[t]["max_abs_diff"] = agreement(
                    share, pm, make_batch(vocab, 2 * t, 16, device), mixed_tasks(share.state.task_names, 2 * t)
                )
            print(f"T={t}: {memory[t]}", flush=True)
            del share, pm
    t_speed = md_table(
        [
            "batch (examples × tokens)",
            "Share mixed (ms)",
            "PEFT mixed (ms)",
            "base model, no adapter (ms)",
            "Share throughput / PEFT",
            "ceiling: PEFT / base",
            "Share overhead vs base",
            "PEFT overhead vs base",
            "max |Δ logit|",
        ],
        [
            [
                f"{r['batch'][0]} × {r['batch'][1]}",
                fmt(r["time"]["share"].median * 1e3),
                fmt(r["time"]["peft"].median * 1e3),
                fmt(r["time"]["base"].median * 1e3),
                f"{r['ratio']:.2f}×",
                f"{r['time']['peft'].median / r['time']['base'].median:.2f}×",
                f"{r['time']['share'].median / r['time']['base'].median - 1:+.0%}",
                f"{r['time']['peft'].median / r['time']['base'].median - 1:+.0%}",
                fmt(r["max_abs_diff"]),
            ]
            for r in runs
        ],
    )
    cuda = device.type == "cuda"
    t_mem = md_table(
        [
            "tasks",
            "Share stored: basis + coefficients + heads (MB)",
            "Share resident: state + layer buffers (MB)",
            "PEFT resident: LoRA + head copies (MB)",
            "PEFT / Share resident",
            "RSS growth Share (MB)",
            "RSS growth PEFT (MB)",
            *(["GPU memory growth Share (MB)", "GPU memory growth PEFT (MB)"] if cuda else []),
        ],
        [
            [
                t,
                fmt(m["share_stored_bytes"] / MB),
                fmt(m["share_resident_bytes"] / MB),
                fmt(m["peft_bytes"] / MB),
                f"{m['peft_bytes'] / m['share_resident_bytes']:.1f}×",
                fmt(m["share_rss_delta"] / MB),
                fmt(m["peft_rss_delta"] / MB),
                *([fmt(m["share_device_delta"] / MB), fmt(m["peft_device_delta"] / MB)] if cuda else []),
            ]
            for t, m in memory.items()
        ],
    )
    worst = max([r["max_abs_diff"] for r in runs] + [m.get("max_abs_diff", 0.0) for m in memory.values()])
    targets = [
        Target(
            f"mixed batch of {tasks} tasks: Share throughput ≥ 2× PEFT (batch {r['batch'][0]} × {r['batch'][1]})",
            r["ratio"] >= 2.0,
            f"{r['ratio']:.2f}×",
        )
        for r in runs
    ]
    targets.append(
        Target(
            "Share and PEFT serve the same updates (max |Δ logit| ≤ 1e-4)",
            worst <= 1e-4,
            f"max |Δ logit| = {fmt(worst)}",
        )
    )
    sections = [t_speed, t_mem]
    if served:
        tm = served["time"]
        sections.append(
            md_table(
                [
                    "text requests (rows of mixed tasks)",
                    "MLflow pyfunc predict (ms)",
                    "same predict in process (ms)",
                    "PEFT adapter_names batch (ms)",
                    "pyfunc / in process",
                    "PEFT / pyfunc",
                ],
                [
                    [
                        served["batch"],
                        fmt(tm["pyfunc"].median * 1e3),
                        fmt(tm["in-process"].median * 1e3),
                        fmt(tm["peft"].median * 1e3),
                        f"{served['overhead']:.2f}×",
                        f"{served['vs_peft']:.2f}×",
                    ]
                ],
            )
        )
        targets.append(
            Target(
                "MLflow pyfunc layer overhead ≤ 1.3× the in-process mixed predict",
                served["overhead"] <= 1.3,
                f"{served['overhead']:.2f}×",
            )
        )
    intro = (
        f"{model_text}; LoRA r = {RANK} on {bm.targets} ({n_layers} modules); Share k = {K} per side; device {device}. "
        f"Throughput: one batch mixing {tasks} tasks (each equally often, shuffled), Share `forward_mixed` vs PEFT "
        "`adapter_names=`, "
        f"and the bare base model as the floor; {repeats} interleaved repeats, medians, no grad. No adapter method "
        "can beat the bare model, so "
        "PEFT / base is the ceiling of the Share / PEFT throughput ratio on this device. Memory: bytes of the "
        "stored tensors, "
        "and the process RSS growth while the adapter state is built/loaded (after gc and malloc_trim; includes "
        "allocator and loader overhead, so indicative)"
        + ("; on the GPU, torch's allocated-memory growth for the same step." if cuda else ".")
    )
    results = {"model": args.model, "device": str(device), "throughput": runs, "memory": memory, "pyfunc": served}
    write_report(
        args.out,
        "serving",
        "Serving: mixed-task batches and adapter memory",
        intro,
        sections,
        targets,
        results,
        env,
        time.perf_counter() - t0,
        args.quick,
    )


if __name__ == "__main__":
    main()
