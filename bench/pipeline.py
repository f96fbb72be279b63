"""Pipeline overhead: landing → registered version in the embedded stack, against the same
training and evaluation run bare, in the same process, landing by landing.

Orchestrated: the landing is written to local-directory storage and the `continual-update`
flow runs on Prefect's ephemeral server (validate, ingest, train, the version's DVC stage file +
commit, mapped evaluation of every task, MLflow run + model version + aliases on sqlite, git
commit, `dvc push`, storage mark). Bare: `pipelines.update.build_version` then
`pipelines.evaluate.evaluate_version` on a plain directory — the compute alone. The overhead
of a landing is orchestrated wall time minus bare train + evaluate time. Bare and orchestrated
runs alternate per landing so that load from other processes hits both alike. The ephemeral
server's one-off start is reported separately (a `prefect server` in production is already up).
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from .common import Target, environment, fmt, md_table, parse_args, write_report

TASKS = ["sentiment", "topic", "tense"]
TARGET_OVERHEAD_S = 15.0


def _params(root: Path, steps: int, model_path: str | None) -> None:
    from pipelines.params import Params, save_params
    from pipelines.workspace import Workspace

    save_params(Workspace(root).params_path, Params().replace(train={"steps": steps}, base={"model_path": model_path}))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(__doc__.splitlines()[0], argv)
    t_start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="share-bench-pipeline-"))
    os.environ["PREFECT_HOME"] = str(tmp / "prefect")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    steps, n_train, n_eval = (3, 32, 16) if args.quick else (40, 192, 128)

    from prefect import flow

    from flows.continual import continual_update
    from pipelines import evaluate as ev
    from pipelines import lineage
    from pipelines.params import load_params
    from pipelines.storage import LocalStorage
    from pipelines.update import build_version
    from pipelines.workspace import Workspace
    from share_core.tasks import generate_tasks

    dirs = generate_tasks(tmp / "tasks", names=TASKS, n_train=n_train, n_eval=n_eval)
    bare = Workspace(tmp / "bare")
    bare.root.mkdir()
    _params(bare.root, steps, None)
    orch = Workspace(tmp / "orchestrated")
    lineage.init_workspace(orch.root, remote=str(tmp / "dvc-remote"))
    _params(orch.root, steps, None)
    storage = LocalStorage(tmp / "bucket")

    @flow(name="warm-up")
    def warm_up() -> None:
        return None

    t0 = time.perf_counter()
    warm_up()
    server_start = time.perf_counter() - t0

    rows, per = [], []
    for i, d in enumerate(dirs):
        version, parent = f"v{i + 1:04d}", (f"v{i:04d}" if i else None)
        # bare: the same compute with no orchestration, storage, registry or lineage
        landing_copy = bare.landings / d.name
        landing_copy.parent.mkdir(parents=True, exist_ok=True)
        if not landing_copy.exists():
            os.symlink(d, landing_copy)
        t0 = time.perf_counter()
        build_version(
            [landing_copy],
            "dataset",
            bare.version_dir(version),
            bare.version_dir(parent) if parent else None,
            load_params(bare.params_path),
        )
        t1 = time.perf_counter()
        ev.evaluate_version(bare, version)
        t2 = time.perf_counter()
        # orchestrated: the landing lands in storage and the flow takes it from there
        t3 = time.perf_counter()
        key = storage.upload_task(d, "dataset", d.name)
        out = continual_update(key=key, storage_url=storage.describe(), workspace=str(orch.root))
        t4 = time.perf_counter()
        assert out["status"] == "processed" and out["version"] == version, out
        r = {
            "task": d.name,
            "version": version,
            "bare_train_s": t1 - t0,
            "bare_eval_s": t2 - t1,
            "orchestrated_s": t4 - t3,
            "flow_train_s": out["seconds"]["train"],
            "flow_eval_s": out["seconds"]["evaluate"],
        }
        r["overhead_s"] = r["orchestrated_s"] - r["bare_train_s"] - r["bare_eval_s"]
        r["ratio"] = r["orchestrated_s"] / (r["bare_train_s"] + r["bare_eval_s"])
        per.append(r)
        rows.append(
            [
                d.name,
                version,
                fmt(r["bare_train_s"], 1),
                fmt(r["bare_eval_s"], 1),
                fmt(r["orchestrated_s"], 1),
                fmt(r["overhead_s"], 1),
                f"{r['ratio']:.2f}×",
            ]
        )

    worst = max(r["overhead_s"] for r in per)
    mean = sum(r["overhead_s"] for r in per) / len(per)
    table = md_table(
        [
            "landing",
            "version",
            "bare train s",
            "bare evaluate s",
            "orchestrated s",
            "overhead s",
            "orchestrated / bare",
        ],
        rows,
    )
    targets = [
        Target(
            "orchestration overhead ≤ 15 s per landing",
            worst <= TARGET_OVERHEAD_S,
            f"worst {worst:.1f} s, mean {mean:.1f} s over {len(per)} landings (MiniLM, {steps} steps)",
        )
    ]
    intro = (
        f"{len(per)} generated dataset landings on MiniLM ({steps} training steps each, {n_eval} eval rows per task). "
        f"Overhead = orchestrated wall − bare (train + evaluate) for the same landing. Prefect's ephemeral server "
        f"started once in {server_start:.1f} s before the first landing (not counted)."
    )
    write_report(
        args.out,
        "pipeline",
        "Pipeline: landing → registered version",
        intro,
        [table],
        targets,
        {"landings": per, "server_start_s": server_start, "steps": steps},
        environment(),
        time.perf_counter() - t_start,
        args.quick,
    )


if __name__ == "__main__":
    main()
