"""Training and evaluation: one fit loop for plain LoRA (first task, baselines), Share
continual adaptation and Share-full finetuning; one evaluation for every method.

Tasks are `taskdata.TaskData`: sequence classification (cross-entropy on the task's labels)
or causal LM (next-token loss; metric: next-token accuracy).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from peft import LoraConfig, get_peft_model
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn

from .model import last_linear
from .peft_io import LoraAdapter, adapter_from_peft_model
from .subspace import KPolicy
from .taskdata import TaskData


@dataclass(frozen=True)
class TrainConfig:
    """Every knob of one task's training. rank p and lora_alpha give the scale s = α/p."""

    steps: int = 80
    batch_size: int = 16
    lr: float = 3e-3
    max_length: int = 32
    rank: int = 8
    lora_alpha: float = 16.0
    seed: int = 0
    progress: bool = True

    @property
    def scale(self) -> float:
        return self.lora_alpha / self.rank


def encode(tokenizer, task: TaskData, rows: list[dict], max_length: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Tokenise rows once: input_ids/attention_mask (+labels: class ids, or -100-masked ids)."""
    texts = [r[task.spec.text_field] for r in rows]
    enc = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    if task.spec.is_classification:
        batch["labels"] = torch.tensor(task.label_ids(rows))
    else:
        batch["labels"] = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    return {k: v.to(device) for k, v in batch.items()}


def _loss(model: nn.Module, batch: dict[str, torch.Tensor], classification: bool) -> torch.Tensor:
    if classification:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return nn.functional.cross_entropy(logits, batch["labels"])
    return model(**batch).loss


def fit(model: nn.Module, params: list[nn.Parameter], tokenizer, task: TaskData, cfg: TrainConfig, desc: str) -> list[float]:
    """AdamW on `params` for cfg.steps minibatches sampled with a seeded generator; losses."""
    if not params:
        raise ValueError("nothing to train: no parameter requires grad")
    device = params[0].device
    data = encode(tokenizer, task, task.train, cfg.max_length, device)
    n = data["input_ids"].shape[0]
    g = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    model.train()
    losses = []
    # dropout draws from the global RNG: seed it for this fit only, so the same landing trains
    # the same way in a long-lived worker whatever ran before, and callers' RNG is untouched
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]:.3f}"), TimeElapsedColumn(), disable=not cfg.progress, transient=True) as bar:
        torch.manual_seed(cfg.seed)
        job = bar.add_task(desc, total=cfg.steps, loss=float("nan"))
        for _ in range(cfg.steps):
            idx = torch.randint(0, n, (min(cfg.batch_size, n),), generator=g).to(device)
            batch = {k: v[idx] for k, v in data.items()}
            loss = _loss(model, batch, task.spec.is_classification)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            bar.update(job, advance=1, loss=losses[-1])
    model.eval()
    return losses


@torch.no_grad()
def evaluate(model: nn.Module, tokenizer, task: TaskData, max_length: int = 32, batch_size: int = 64) -> float:
    """Accuracy on the task's eval rows (classification), or next-token accuracy (causal LM)."""
    model.eval()
    device = next(model.parameters()).device
    correct = total = 0
    for start in range(0, len(task.eval), batch_size):
        batch = encode(tokenizer, task, task.eval[start:start + batch_size], max_length, device)
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        if task.spec.is_classification:
            correct += int((out.argmax(-1) == batch["labels"]).sum())
            total += batch["labels"].numel()
        else:
            pred, gold = out[:, :-1].argmax(-1), batch["labels"][:, 1:]
            mask = gold != -100
            correct += int(((pred == gold) & mask).sum())
            total += int(mask.sum())
    return correct / max(total, 1)


def set_classifier_labels(model: nn.Module, head_modules: list[str], num_labels: int, seed: int) -> None:
    """Give a classification model a fresh last head Linear with `num_labels` outputs (std 0.02)."""
    path = last_linear(model, head_modules)
    old = model.get_submodule(path)
    g = torch.Generator().manual_seed(seed)
    new = nn.Linear(old.in_features, num_labels, bias=old.bias is not None).to(old.weight.device)
    with torch.no_grad():
        new.weight.copy_(torch.randn(num_labels, old.in_features, generator=g) * 0.02)
        if new.bias is not None:
            new.bias.zero_()
    owner, _, child = path.rpartition(".")
    setattr(model.get_submodule(owner) if owner else model, child, new)
    if hasattr(model, "num_labels"):
        model.num_labels = num_labels


def train_lora(model: nn.Module, tokenizer, task: TaskData, cfg: TrainConfig, target_modules: list[str], head_modules: list[str], base_model_id: str) -> LoraAdapter:
    """Train `task` as an ordinary PEFT LoRA on `model` and return it; `model` is left unadapted
    (PEFT's unload). Used for the first task of a subspace and as the per-task LoRA baseline."""
    if task.spec.is_classification:
        set_classifier_labels(model, head_modules, len(task.spec.labels), cfg.seed)
    lcfg = LoraConfig(r=cfg.rank, lora_alpha=cfg.lora_alpha, target_modules=target_modules, modules_to_save=head_modules or None, lora_dropout=0.0, base_model_name_or_path=base_model_id)
    torch.manual_seed(cfg.seed)
    with warnings.catch_warnings():  # PEFT swaps in the local path for the id; the id is restored below
        warnings.filterwarnings("ignore", message=".*base_model_name_or_path.*renamed")
        peft_model = get_peft_model(model, lcfg)
    try:
        fit(peft_model, [p for p in peft_model.parameters() if p.requires_grad], tokenizer, task, cfg, f"LoRA {task.spec.name}")
        adapter = adapter_from_peft_model(peft_model, task.spec.name)
    finally:
        peft_model.unload()
    adapter.base_model_name = base_model_id
    return adapter


def train_task(share_model, tokenizer, task: TaskData, cfg: TrainConfig, policy: KPolicy | None = None, info: dict | None = None) -> dict[str, float]:
    """Continual adaptation: learn `task` in the frozen subspace (+φ temporary directions),
    then merge it in. Returns each task's relative ΔW reconstruction error after the merge."""
    num_labels = len(task.spec.labels) if task.spec.is_classification else None
    params = share_model.begin_task(task.spec.name, rank=cfg.rank, scale=cfg.scale, num_labels=num_labels, seed=cfg.seed, info=info)
    fit(share_model, params, tokenizer, task, cfg, f"Share {task.spec.name}")
    return share_model.finish_task(policy)


def finetune_task(share_model, tokenizer, task: TaskData, cfg: TrainConfig) -> None:
    """Share-full: retrain an existing task's coefficients and head on its data, basis frozen."""
    params = share_model.begin_finetune(task.spec.name)
    fit(share_model, params, tokenizer, task, cfg, f"Share-full {task.spec.name}")
    share_model.finish_task()
