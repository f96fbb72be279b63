"""The continual loop: learn tasks one after another in one subspace, scoring every past task
after each step. Shared by the demo, the tests and the benchmarks."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .base import BaseSpec, load_base
from .families import family_of
from .metrics import AccuracyMatrix
from .model import ShareModel
from .subspace import KPolicy
from .taskdata import TaskData
from .train import TrainConfig, evaluate, train_lora, train_task


@dataclass
class ContinualRun:
    model: ShareModel
    scores: AccuracyMatrix
    seconds: dict[str, float] = field(default_factory=lambda: {"train": 0.0, "evaluate": 0.0})  # train includes merges
    errors: list[dict[str, float]] = field(default_factory=list)  # per step: task -> relative ΔW error


def learn(
    share: ShareModel | None,
    model,
    tokenizer,
    task: TaskData,
    cfg: TrainConfig,
    policy: KPolicy,
    phi: int,
    base: BaseSpec,
    timing: dict[str, float],
) -> tuple[ShareModel, dict[str, float]]:
    """One continual step: the first task trains as a plain LoRA on the base's target modules
    and heads and initialises the subspace; later ones train in it (with φ temporary
    directions) and merge under `policy`."""
    if task.spec.type != base.family:
        raise ValueError(
            f"task {task.spec.name!r} is of type {task.spec.type!r}; the base model serves {base.family!r}"
        )
    t0 = time.perf_counter()
    info = {"labels": list(task.spec.labels)}
    if share is None:
        adapter = train_lora(model, tokenizer, task, cfg, base.targets(), base.heads(), base.model_id)
        share = ShareModel.from_adapters(
            model, [adapter], base_model_id=base.model_id, policy=policy, phi=phi, infos=[{**info, "source": "dataset"}]
        )
        errors = {task.spec.name: 0.0}
    else:
        share.state.phi = phi  # the current params' φ, not the one the subspace was created with
        errors = train_task(share, tokenizer, task, cfg, policy, info=info)
    timing["train"] += time.perf_counter() - t0
    return share, errors


def score_all(share: ShareModel, tokenizer, tasks: list[TaskData], max_length: int) -> list[float]:
    """Each task's metric with its own coefficients and head."""
    out = []
    for task in tasks:
        share.activate(task.spec.name)
        out.append(evaluate(share, tokenizer, task, max_length))
    share.activate(None)
    return out


def run_continual(
    tasks: list[TaskData],
    cfg: TrainConfig,
    policy: KPolicy,
    phi: int = 2,
    base: BaseSpec | None = None,
    on_step: Callable[[int, AccuracyMatrix], None] | None = None,
) -> ContinualRun:
    """Learn `tasks` in order (strict: no replay) and fill the accuracy matrix."""
    base = base or BaseSpec()
    model, tok = load_base(base, cfg.seed)
    share, scores, timing, all_errors = None, AccuracyMatrix(), {"train": 0.0, "evaluate": 0.0}, []
    for i, task in enumerate(tasks):
        share, errors = learn(share, model, tok, task, cfg, policy, phi, base, timing)
        all_errors.append(errors)
        t0 = time.perf_counter()
        scores.add_row(
            task.spec.name, family_of(task.spec).baseline(task), score_all(share, tok, tasks[: i + 1], cfg.max_length)
        )
        timing["evaluate"] += time.perf_counter() - t0
        if on_step:
            on_step(i, scores)
    return ContinualRun(share, scores, timing, all_errors)
