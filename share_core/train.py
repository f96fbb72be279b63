"""Training and evaluation: one fit loop for plain LoRA (first task, baselines), Share
continual adaptation and Share-full finetuning; one evaluation for every method.

Tasks are `taskdata.TaskData`; the task's family (`share_core.families`) batches its rows,
gives the loss and scores it, so nothing here depends on the kind of task.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import torch
from peft import LoraConfig, get_peft_model
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn

from .families import family_of
from .peft_io import LoraAdapter, adapter_from_peft_model
from .subspace import KPolicy
from .taskdata import TaskData

log = logging.getLogger(
    __name__
)  # progress when the rich bar is off (services: the orchestrator forwards it to its run logs)
LOG_POINTS = 10  # loss lines per fit


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

    def __post_init__(self) -> None:
        if (
            min(self.steps, self.batch_size, self.rank) < 1
            or self.max_length < 2
            or not self.lr > 0
            or not self.lora_alpha > 0
        ):
            raise ValueError(
                f"train: steps, batch_size and rank must be ≥ 1, max_length ≥ 2, lr and lora_alpha > 0 (got {self})"
            )

    @property
    def scale(self) -> float:
        return self.lora_alpha / self.rank


def fit(
    model: nn.Module, params: list[nn.Parameter], tokenizer, task: TaskData, cfg: TrainConfig, desc: str
) -> list[float]:
    """AdamW on `params` for cfg.steps minibatches sampled with a seeded generator; losses."""
    if not params:
        raise ValueError("nothing to train: no parameter requires grad")
    device = params[0].device
    fam = family_of(task.spec)
    data = fam.encode(tokenizer, task.spec, task.train, cfg.max_length, device)
    n = data["input_ids"].shape[0]
    g = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    model.train()
    losses = []
    # dropout draws from the global RNG: seed it for this fit only, so the same landing trains
    # the same way in a long-lived worker whatever ran before, and callers' RNG is untouched
    with (
        torch.random.fork_rng(devices=[device] if device.type == "cuda" else []),
        Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.3f}"),
            TimeElapsedColumn(),
            disable=not cfg.progress,
            transient=True,
        ) as bar,
    ):
        torch.manual_seed(cfg.seed)
        job = bar.add_task(desc, total=cfg.steps, loss=float("nan"))
        for _ in range(cfg.steps):
            idx = torch.randint(0, n, (min(cfg.batch_size, n),), generator=g).to(device)
            batch = {k: v[idx] for k, v in data.items()}
            loss = fam.loss(model, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            bar.update(job, advance=1, loss=losses[-1])
            if not cfg.progress and (len(losses) % max(1, cfg.steps // LOG_POINTS) == 0 or len(losses) == cfg.steps):
                log.info("%s: step %d/%d, loss %.4f", desc, len(losses), cfg.steps, losses[-1])
    model.eval()
    return losses


def evaluate(
    model: nn.Module, tokenizer, task: TaskData, max_length: int = 32, batch_size: int = 64, max_new_tokens: int = 16
) -> float:
    """The task's metric on its eval rows with the model as it is (task already activated)."""
    model.eval()
    items = [(task.spec.name, task.spec, row) for row in task.eval]
    return family_of(task.spec).score(
        model,
        tokenizer,
        items,
        max_length=max_length,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        mixed=False,
    )[task.spec.name]["score"]


def train_lora(
    model: nn.Module,
    tokenizer,
    task: TaskData,
    cfg: TrainConfig,
    target_modules: list[str],
    head_modules: list[str],
    base_model_id: str,
) -> LoraAdapter:
    """Train `task` as an ordinary PEFT LoRA on `model` and return it; `model` is left unadapted
    (PEFT's unload). Used for the first task of a subspace and as the per-task LoRA baseline."""
    family_of(task.spec).prepare(model, task.spec, head_modules, cfg.seed)
    lcfg = LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.lora_alpha,
        target_modules=target_modules,
        modules_to_save=head_modules or None,
        lora_dropout=0.0,
        base_model_name_or_path=base_model_id,
    )
    torch.manual_seed(cfg.seed)
    with (
        warnings.catch_warnings()
    ):  # PEFT swaps in the local path for the id (restored below); its transformers-5 deprecation notice is not ours
        warnings.filterwarnings("ignore", message=".*base_model_name_or_path.*renamed")
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        peft_model = get_peft_model(model, lcfg)
    try:
        fit(
            peft_model,
            [p for p in peft_model.parameters() if p.requires_grad],
            tokenizer,
            task,
            cfg,
            f"LoRA {task.spec.name}",
        )
        adapter = adapter_from_peft_model(peft_model, task.spec.name)
    finally:
        peft_model.unload()
    adapter.base_model_name = base_model_id
    return adapter


def train_task(
    share_model, tokenizer, task: TaskData, cfg: TrainConfig, policy: KPolicy | None = None, info: dict | None = None
) -> dict[str, float]:
    """Continual adaptation: learn `task` in the frozen subspace (+φ temporary directions),
    then merge it in. Returns each task's relative ΔW reconstruction error after the merge."""
    num_labels = family_of(task.spec).num_labels(task.spec)
    params = share_model.begin_task(
        task.spec.name, rank=cfg.rank, scale=cfg.scale, num_labels=num_labels, seed=cfg.seed, info=info
    )
    fit(share_model, params, tokenizer, task, cfg, f"Share {task.spec.name}")
    return share_model.finish_task(policy)


def finetune_task(share_model, tokenizer, task: TaskData, cfg: TrainConfig) -> None:
    """Share-full: retrain an existing task's coefficients and head on its data, basis frozen."""
    params = share_model.begin_finetune(task.spec.name)
    fit(share_model, params, tokenizer, task, cfg, f"Share-full {task.spec.name}")
    share_model.finish_task()
