"""`share` — the command line of the Share pipeline (typer + rich)."""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Continual learning in one shared LoRA subspace.")
console = Console()


def matrix_table(scores, title: str) -> Table:
    rows = scores.table()
    table = Table(title=title)
    for h in rows[0]:
        table.add_column(h, justify="right")
    for r in rows[1:]:
        table.add_row(*r)
    return table


@app.command()
def core_demo(
    tasks: int = typer.Option(4, help="how many generated tasks to learn in sequence"),
    steps: int = typer.Option(80, help="training steps per task"),
    k_max: int = typer.Option(32, help="basis columns per side, at most"),
    seed: int = typer.Option(0),
    out: Path | None = typer.Option(None, help="save the final subspace version here"),
) -> None:
    """Learn generated tasks one by one on MiniLM in one subspace (no orchestration) and print
    the accuracy matrix, forgetting and storage against one LoRA per task."""
    from share_core import state as st
    from share_core.continual import run_continual
    from share_core.metrics import accounting
    from share_core.subspace import KPolicy
    from share_core.taskdata import load_task
    from share_core.tasks import TASK_NAMES, generate_tasks
    from share_core.train import TrainConfig

    if not 1 <= tasks <= len(TASK_NAMES):
        raise typer.BadParameter(f"--tasks must be between 1 and {len(TASK_NAMES)}")
    with tempfile.TemporaryDirectory() as tmp:
        dirs = generate_tasks(Path(tmp), names=list(TASK_NAMES[:tasks]), seed=seed)
        data = [load_task(d) for d in dirs]
        cfg = TrainConfig(steps=steps, seed=seed)
        t0 = time.perf_counter()
        run = run_continual(data, cfg, KPolicy(k_max=k_max), on_step=lambda i, s: console.print(f"[green]learned[/] {s.tasks[i]}: score {s.rows[i][i]:.3f} (majority {s.majority[i]:.3f}), ACC {s.acc(i):.3f}, BWT {s.bwt(i):+.3f}"))
        wall = time.perf_counter() - t0
    console.print(matrix_table(run.scores, "Accuracy matrix R[i][j] (Share, strict: no replay)"))
    acct = accounting(run.model.state)
    console.print(
        f"ACC {run.scores.acc():.3f}   BWT {run.scores.bwt():+.3f}   wall {wall:.0f}s "
        f"(train {run.seconds['train']:.0f}s, evaluate {run.seconds['evaluate']:.0f}s)\n"
        f"trainable params for the next task: {acct['trainable_params_next_task']:,}   "
        f"stored: {acct['share_params']:,} params / {acct['share_bytes'] / 1e6:.2f} MB "
        f"vs one LoRA per task {acct['lora_per_task_params']:,} / {acct['lora_per_task_bytes'] / 1e6:.2f} MB "
        f"(×{acct['ratio_vs_lora']:.2f})"
    )
    if out:
        digest = st.save(run.model.state, out)
        console.print(f"saved version {out} (content {digest[:12]})")
    console.print_json(json.dumps({"acc": run.scores.acc(), "bwt": run.scores.bwt(), "matrix": run.scores.rows}))


if __name__ == "__main__":
    app()
