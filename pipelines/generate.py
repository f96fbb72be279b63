"""Step `generate`: write the generated tasks named in params.yaml (`tasks:` section) as landing
directories in the storage format — the first stage of the repository's own dvc.yaml."""

from __future__ import annotations

import shutil
from pathlib import Path

import typer
import yaml

from share_core.tasks import generate_tasks

app = typer.Typer(add_completion=False, help=__doc__)


@app.command()
def main(params: Path = typer.Option(Path("params.yaml")), out: Path = typer.Option(Path("landings"))) -> None:
    """Write <out>/<task>/{train.jsonl, eval.jsonl, task.yaml} for every task in params.yaml."""
    cfg = (yaml.safe_load(params.read_text()) or {}).get("tasks")
    if not cfg or not cfg.get("names"):
        raise typer.BadParameter(f"{params}: needs a 'tasks:' section with 'names'")
    shutil.rmtree(out, ignore_errors=True)  # a DVC out: rebuilt whole
    dirs = generate_tasks(
        out,
        names=list(cfg["names"]),
        seed=int(cfg.get("seed", 0)),
        n_train=int(cfg.get("n_train", 256)),
        n_eval=int(cfg.get("n_eval", 128)),
    )
    typer.echo(f"wrote {len(dirs)} tasks to {out}")


if __name__ == "__main__":
    app()
