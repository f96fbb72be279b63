"""Step `evaluate`: score a version on every task it holds (forgetting), build its row of the
accuracy matrix from the parent chain, and draw the forgetting heatmap.

`score_task` scores one task (the unit the orchestrator maps in parallel); `summarize` writes
<workspace>/evaluations/<version>.json and .png. Eval data comes from the ingested landings:
an adapter that landed without eval.jsonl has no score (null), and is shown as such.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import typer  # noqa: E402

from share_core import state as st  # noqa: E402
from share_core.continual import load_classifier  # noqa: E402
from share_core.model import ShareModel  # noqa: E402
from share_core.taskdata import EVAL_FILE, SPEC_FILE, TaskData, read_examples, read_task_spec  # noqa: E402
from share_core.train import evaluate  # noqa: E402

from .update import load_params  # noqa: E402
from .workspace import Workspace, write_atomic  # noqa: E402


def eval_data(ws: Workspace, version: str, task: str) -> TaskData | None:
    """The task's eval rows from its ingested landing (None when it brought none)."""
    entry = next(t for t in st.read_manifest(ws.version_dir(version))["tasks"] if t["name"] == task)
    landing = ws.landings / entry["info"].get("landing", task)
    if not (landing / EVAL_FILE).is_file():
        return None
    spec = read_task_spec(landing / SPEC_FILE)
    return TaskData(spec=spec, train=[], eval=read_examples(landing / EVAL_FILE, spec), root=landing)


def score_task(ws: Workspace, version: str, task: str) -> dict:
    """{"task", "score", "majority"} of one task on one version (score None: no eval data)."""
    data = eval_data(ws, version, task)
    if data is None:
        return {"task": task, "score": None, "majority": None}
    params = load_params(ws.root / "params.yaml")
    model, tok = load_classifier(params.model_path, params.train.seed)
    share = ShareModel(model, st.load(ws.version_dir(version)))
    share.activate(task)
    return {"task": task, "score": evaluate(share, tok, data, params.train.max_length), "majority": data.majority_accuracy()}


def _mean(xs: list) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def summarize(ws: Workspace, version: str, results: list[dict]) -> dict:
    """The version's evaluation record: its scores, ACC, BWT and the matrix along its chain."""
    manifest = st.read_manifest(ws.version_dir(version))
    tasks = [t["name"] for t in manifest["tasks"]]
    by_task = {r["task"]: r for r in results}
    missing = set(tasks) - set(by_task)
    if missing:
        raise ValueError(f"{version}: no evaluation result for tasks {sorted(missing)}")
    parent = manifest["parent"]
    prev = json.loads((ws.root / "evaluations" / f"{parent}.json").read_text()) if parent else None
    rows = (prev["matrix"]["rows"] if prev else []) + [[by_task[t]["score"] for t in tasks]]
    # BWT: each past task's score now minus right after it was learned (its diagonal entry)
    first_seen = {}
    for i, row in enumerate(rows):
        for j, t in enumerate(tasks[: len(row)]):
            first_seen.setdefault(t, row[j])
    added = manifest["extra"].get("added", [])
    drops = [by_task[t]["score"] - first_seen[t] for t in tasks if t not in added and by_task[t]["score"] is not None and first_seen[t] is not None]
    record = {
        "version": version,
        "parent": parent,
        "task": ",".join(added),
        "tasks": tasks,
        "scores": {t: by_task[t]["score"] for t in tasks},
        "majority": {t: by_task[t]["majority"] for t in tasks},
        "matrix": {"tasks": tasks, "rows": rows, "versions": (prev["matrix"]["versions"] if prev else []) + [version]},
        "acc": _mean([by_task[t]["score"] for t in tasks]),
        "bwt": sum(drops) / len(drops) if drops else 0.0,
    }
    out = ws.root / "evaluations"
    out.mkdir(exist_ok=True)
    heatmap(record, out / f"{version}.png")
    write_atomic(out / f"{version}.json", json.dumps(record, indent=2))
    return record


def heatmap(record: dict, path: Path) -> None:
    """R[i][j] as a heatmap: rows = versions along the chain, columns = tasks, blank = not yet."""
    tasks, rows, versions = record["matrix"]["tasks"], record["matrix"]["rows"], record["matrix"]["versions"]
    grid = [[(r[j] if j < len(r) and r[j] is not None else float("nan")) for j in range(len(tasks))] for r in rows]
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(tasks), 1.0 + 0.5 * len(rows)))
    im = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="viridis")
    for i, r in enumerate(grid):
        for j, v in enumerate(r):
            if v == v:
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="white" if v < 0.6 else "black", fontsize=8)
    ax.set_xticks(range(len(tasks)), tasks, rotation=45, ha="right")
    ax.set_yticks(range(len(rows)), versions)
    ax.set_xlabel("evaluated on task")
    ax.set_ylabel("after version")
    ax.set_title(f"{record['version']}: ACC {record['acc']:.3f}  BWT {record['bwt']:+.3f}" if record["acc"] is not None else record["version"])
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def evaluate_version(ws: Workspace, version: str) -> dict:
    """Score every task of `version` (sequentially) and summarize."""
    manifest = st.read_manifest(ws.version_dir(version))
    return summarize(ws, version, [score_task(ws, version, t["name"]) for t in manifest["tasks"]])


app = typer.Typer(add_completion=False, help=__doc__)


@app.command()
def main(version: str, workspace: Path = typer.Option(Path("."))) -> None:
    """Evaluate VERSION on all its tasks; write evaluations/VERSION.json and .png."""
    rec = evaluate_version(Workspace(workspace), version)
    typer.echo(json.dumps({k: rec[k] for k in ("version", "acc", "bwt", "scores")}, indent=2))


if __name__ == "__main__":
    app()
