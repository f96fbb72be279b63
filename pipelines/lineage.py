"""Step `lineage`: the continual chain as a DVC pipeline in the workspace's git repo.

Every version has its own stage file, lineage/<version>/dvc.yaml (stages run from the
workspace root, `wdir: ../..`): a frozen stage "landings" whose outs are the landing(s) it
was built from (how landings become versioned, pushable inputs), and the version's stage, whose
deps are its landing(s) and its parent version and whose out is versions/<id>:

    stages:
      landings: {wdir: ../.., cmd: "true", frozen: true, outs: [landings/topic-1a2b…]}
      v0002:
        wdir: ../..
        cmd: python -m pipelines.update --workspace . --landing landings/topic-1a2b… --kind dataset
             --out versions/v0002 --parent versions/v0001
        deps: [landings/topic-1a2b…, versions/v0001]
        params: [train, subspace, base]
        outs: [versions/v0002]

so `dvc dag` draws the chain (a rollback shows up as a branch), `dvc repro` rebuilds it, and
each lineage/<version>/dvc.lock pins its dep/out hashes — the lineage attached to each MLflow
model version. The flows build a version first and then `dvc commit` its stage file (recording
hashes without re-running it); a landing's commit and push name that one file, so their cost
does not grow with the history. Versions are pushed to the DVC remote (a local dir or S3). The
root dvc.yaml holds the workspace's metrics and plots (and, in workspaces made before the
per-version files, the stages of their versions, with a landings/<name>.dvc per landing).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import typer
import yaml

from share_core.state import chain

from .params import BUILD_SECTIONS, Params, save_params
from .storage import LocalStorage, open_storage
from .workspace import Workspace, write_atomic

os.environ.setdefault("DVC_NO_ANALYTICS", "1")
IGNORED = [
    "mlflow.db",
    "mlartifacts/",
    ".lock",
    ".chain-id",
    "*chain-lease.json*",
    "ledger.json",
    "ledger.log",
    "journal/",
    "watcher-ledger.json",
    "HEAD",
    ".prefect/",
    "evaluations/",
    "bucket/",
    "dvc-remote/",
]
# git ignores every DVC output under these directories with one pattern each, written before DVC
# sees them: DVC otherwise appends one line per output to <dir>/.gitignore and matches every path
# it collects against every line — O(T) patterns × O(T) paths (4 s of a `dvc add` at T = 1,000).
# DVC finds each output already ignored and adds nothing. The .dvc files must stay tracked.
OUT_DIR_IGNORES = {"landings": ["/*", "!/*.dvc", "!/.gitignore"], "versions": ["/*", "!/.gitignore"]}


def _read_yaml(path: Path) -> dict | None:
    """dvc.yaml / dvc.lock, parsed by libyaml (safe; ~20× the pure-Python parser on a long chain's
    dvc.lock)."""
    return yaml.load(path.read_text(), Loader=yaml.CSafeLoader) if path.is_file() else None


def _write_yaml(path: Path, spec: dict) -> None:
    write_atomic(path, yaml.dump(spec, Dumper=yaml.CSafeDumper, sort_keys=False, width=1000))


def _git(root: Path, *args: str) -> str:
    out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} failed in {root}: {out.stderr.strip()}")
    return out.stdout.strip()


def storage_remote(storage_url: str) -> tuple[str, str | None]:
    """The DVC remote (url, endpoint_url) that goes with a landing storage: `dvcstore/` beside
    `incoming/` under its prefix (s3://bucket/prefix/dvcstore, or <dir>/dvcstore), so the
    versions are kept where the landings are, on the same server and credentials."""
    s = open_storage(storage_url)
    if isinstance(s, LocalStorage):
        return str(s.root.resolve() / "dvcstore"), None
    return f"s3://{s.bucket}/{s.prefix + '/' if s.prefix else ''}dvcstore", s.endpoint_url


CACHE_TYPE = "hardlink,copy"


def init_workspace(
    root: Path,
    remote: str | None = None,
    endpoint_url: str | None = None,
    params: Params | None = None,
    storage_url: str | None = None,
) -> None:
    """Make `root` a git + DVC repo with params.yaml (`params`, default: the defaults; an
    existing one is kept), an empty dvc.yaml and (optionally) a default remote (a local path or
    s3://…; credentials stay in the AWS environment). With `storage_url` and no `remote`, a
    workspace without a remote gets `storage_remote(storage_url)` (what `share serve` does; an
    existing remote is kept). Idempotent."""
    root = Path(root).resolve()
    if remote is None and storage_url and not has_remote(root):
        remote, endpoint_url = storage_remote(storage_url)
    root.mkdir(parents=True, exist_ok=True)
    if not (root / ".git").exists():
        _git(root, "init", "-q", "-b", "main")
    for key, value in (("user.name", "share pipeline"), ("user.email", "share@localhost")):
        if not subprocess.run(["git", "config", key], cwd=root, capture_output=True, text=True).stdout.strip():
            _git(root, "config", key, value)
    if remote or not (root / ".dvc").exists():
        _setup_dvc(root, remote, endpoint_url)
    if not Workspace(root).params_path.exists():
        save_params(Workspace(root).params_path, params or Params())
    if not (root / "dvc.yaml").exists():
        _write_yaml(root / "dvc.yaml", {"stages": {}, **reports(Workspace(root))})
    ignore = root / ".gitignore"
    have = ignore.read_text().splitlines() if ignore.exists() else []
    write_atomic(ignore, "\n".join(have + [x for x in IGNORED if x not in have]) + "\n")
    ignore_outputs(root)
    ignores = [f"{d}/.gitignore" for d in OUT_DIR_IGNORES]
    _git(root, "add", "-A", ".gitignore", ".dvc", "params.yaml", "dvc.yaml", *ignores)
    _commit_staged(root, "share workspace: params, dvc.yaml, remote")


# `dvc init` and the config a workspace needs, through DVC's API in one child process: four
# `dvc` commands cost ~4 s CPU (each start-up imports DVC again), this ~1 s. A child, not this
# process: importing dvc configures logging process-wide (it silences asyncio's logger).
# The workspace file and DVC's cache copy are one inode (cache.type): versions are written once,
# never edited. Not "reflink,hardlink,copy": with reflink first, DVC 3 copies on ext4 (measured:
# every file a second inode); hardlink first links, and copies only across devices.
_SETUP_DVC = """
import os, sys
from dvc.repo import Repo
root, cache_type, remote, endpoint = sys.argv[1:]
fresh = not os.path.isdir(os.path.join(root, ".dvc"))
repo = Repo.init(root) if fresh else Repo(root)
with repo.config.edit("repo") as conf:
    if fresh:
        conf["core"]["analytics"] = False
        conf["cache"]["type"] = cache_type
    if remote:  # = dvc remote add -d -f storage <remote> [+ modify endpointurl]
        conf["remote"]["storage"] = {"url": remote, **({"endpointurl": endpoint} if endpoint else {})}
        conf["core"]["remote"] = "storage"
repo.close()
"""


def _setup_dvc(root: Path, remote: str | None, endpoint_url: str | None) -> None:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    argv = [sys.executable, "-c", _SETUP_DVC, str(root), CACHE_TYPE, remote or "", endpoint_url or ""]
    out = subprocess.run(argv, cwd=root, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        lines = (out.stderr.strip() or out.stdout.strip()).splitlines()
        raise RuntimeError(f"setting up DVC in {root} failed: {lines[-1] if lines else out.returncode}")


def ignore_outputs(root: Path) -> None:
    """Write OUT_DIR_IGNORES (idempotent; replaces the per-output lines an older workspace has,
    which the patterns cover)."""
    for name, patterns in OUT_DIR_IGNORES.items():
        path = Path(root) / name / ".gitignore"
        if not path.is_file() or path.read_text().splitlines() != patterns:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, "\n".join(patterns) + "\n")


def cache_links(root: Path, rel: str) -> dict:
    """How the files under `rel` share bytes with DVC's cache: {"files", "linked"} (linked: the
    workspace file's inode has more than one link, i.e. it is the cache's file)."""
    files = [p for p in (Path(root) / rel).rglob("*") if p.is_file() and not p.name.startswith(".")]
    return {"files": len(files), "linked": sum(p.stat().st_nlink > 1 for p in files)}


def _commit_staged(root: Path, message: str) -> None:
    """Commit what is staged, if anything (other untracked files in the workspace stay out)."""
    if _git(root, "diff", "--cached", "--name-only"):
        _git(root, "commit", "-q", "-m", message)


def _dvc_cli(root: Path, *args: str) -> str:
    """The dvc command line in `root`. DVC's Python API resolves paths against the process's
    cwd, which flows running in threads cannot change safely; a subprocess can."""
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "PAGER": "cat", "DVC_PAGER": "cat"}
    out = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"dvc {' '.join(args)} failed in {root}: {out.stderr.strip() or out.stdout.strip()}")
    return out.stdout


def stage(version: str, landings: list[str], kind: str, parent: str | None) -> dict:
    """The dvc.yaml stage that (re)builds `version` with pipelines.update."""
    cmd = ["python -m pipelines.update --workspace ."]
    cmd += [f"--landing landings/{n}" for n in landings]
    cmd += [f"--kind {kind} --out versions/{version}"] + ([f"--parent versions/{parent}"] if parent else [])
    deps = [f"landings/{n}" for n in landings] + ([f"versions/{parent}"] if parent else [])
    return {"cmd": " ".join(cmd), "deps": deps, "params": sorted(BUILD_SECTIONS), "outs": [f"versions/{version}"]}


def reports(ws: Workspace) -> dict:
    """dvc.yaml's top-level metrics and plots: HEAD's metrics, the history of HEAD moves (ACC and
    BWT per step) and HEAD's heatmap (pipelines.evaluate.publish_head writes them)."""
    rel = lambda p: p.relative_to(ws.root).as_posix()  # noqa: E731
    return {
        "metrics": [rel(ws.head_metrics_path)],
        "plots": [
            {rel(ws.history_path): {"x": "step", "y": ["acc", "bwt"], "title": "ACC and BWT of HEAD, per version"}},
            rel(ws.heatmap_path),
        ],
    }


STAGES = "lineage"  # lineage/<version>/dvc.yaml (+ dvc.lock): one version's stages


def stage_file(root: Path, version: str) -> Path:
    return Path(root) / STAGES / version / "dvc.yaml"


def _own_file(root: Path, version: str) -> str | None:
    """lineage/<v>/dvc.yaml relative to the workspace, None in a workspace made before the
    per-version files (the version's stage is in the root dvc.yaml)."""
    f = stage_file(root, version)
    return f.relative_to(root).as_posix() if f.is_file() else None


def _target(root: Path, version: str) -> str:
    """How DVC names the version's stage: lineage/<v>/dvc.yaml:<v>, or <v> in the root dvc.yaml."""
    own = _own_file(root, version)
    return f"{own}:{version}" if own else version


def locked_stage(root: Path, version: str) -> dict | None:
    """The version's dvc.lock entry (its dep and out hashes), None before `dvc commit` wrote it."""
    lock = stage_file(root, version).with_name("dvc.lock")
    lock = lock if lock.is_file() else Path(root) / "dvc.lock"
    return ((_read_yaml(lock) or {}).get("stages") or {}).get(version)


def add_version_stage(root: Path, version: str, landings: list[str], kind: str, parent: str | None) -> None:
    """Write lineage/<version>/dvc.yaml — a frozen stage "landings" whose outs are the landings
    (what makes them versioned, pushable inputs) and the version's stage — and record their
    hashes in its dvc.lock with one `dvc commit` of that file (the version is already built).

    Why a file per version: DVC rewrites a whole dvc.lock on every commit (ruamel, ~1 MB/s) and
    `dvc add` parses every .dvc file in the repository, so one dvc.yaml and a .dvc file per
    landing made each landing O(T) (5.5 + 4.9 s at T = 1,000). A commit or push that names one
    file reads only that file. `dvc dag`/`repro`/`status` still see every version."""
    root = Path(root).resolve()
    ignore_outputs(root)  # a workspace made before the patterns gets them
    spec = _read_yaml(root / "dvc.yaml") or {}
    if any(key not in spec for key in reports(Workspace(root))):  # workspaces made before the reports
        _write_yaml(root / "dvc.yaml", {**spec, **{k: v for k, v in reports(Workspace(root)).items() if k not in spec}})
    # a landing `dvc add`-ed by a workspace made before this layout keeps its .dvc file
    new = [f"landings/{n}" for n in landings if not (root / "landings" / f"{n}.dvc").is_file()]
    stages = {"landings": {"wdir": "../..", "cmd": "true", "frozen": True, "outs": new}} if new else {}
    stages[version] = {"wdir": "../..", **stage(version, landings, kind, parent)}
    path = stage_file(root, version)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_yaml(path, {"stages": stages})
    _dvc_cli(root, "commit", "-q", "-f", path.relative_to(root).as_posix())


def remove_version_stage(root: Path, version: str) -> None:
    """Take a never-published version's stages out of the lineage (a discarded update)."""
    root = Path(root).resolve()
    shutil.rmtree(stage_file(root, version).parent, ignore_errors=True)
    for name in ("dvc.yaml", "dvc.lock"):  # a workspace made before the per-version files
        path = root / name
        spec = _read_yaml(path)
        if spec and version in (spec.get("stages") or {}):
            del spec["stages"][version]
            _write_yaml(path, spec)
    _git(root, "add", "-A", "dvc.yaml", *(["dvc.lock"] if (root / "dvc.lock").exists() else []), STAGES)
    _commit_staged(root, f"discard {version}: its update was superseded before it was published")


def record_version(root: Path, version: str, message: str) -> dict:
    """git-commit the chain's metadata; return the lineage to attach to the MLflow version:
    the git revision and the stage's dvc.lock entry (dep and out hashes)."""
    root = Path(root).resolve()
    tracked = ["dvc.yaml", "dvc.lock", "params.yaml", ".gitignore", "landings", "versions/.gitignore", STAGES]
    _git(root, "add", "-A", *[t for t in tracked if (root / t).exists()])
    _commit_staged(root, message)
    lock = locked_stage(root, version)
    if lock is None:
        raise RuntimeError(f"no dvc.lock holds stage {version}: its `dvc commit` has not run")
    hashes = {e["path"]: e.get("md5", "") for e in lock.get("deps", []) + lock.get("outs", [])}
    return {"git_rev": _git(root, "rev-parse", "HEAD"), "dvc_stage": version, "dvc_hashes": hashes}


def has_remote(root: Path) -> bool:
    cfg = Path(root) / ".dvc" / "config"
    return cfg.is_file() and "remote" in cfg.read_text()


def push(root: Path, versions: list[str] | None = None, landings: list[str] = ()) -> None:
    """Upload `versions` and the landings they were built from (default: everything) to the
    DVC remote (no-op without one). A landing pushes only what it added, whatever the history:
    its version's stage file (landings and version), or in a workspace made before those files
    the version's stage and `landings` (their .dvc files)."""
    root = Path(root).resolve()
    if not has_remote(root):
        return
    targets = [_own_file(root, v) or v for v in versions or []]
    targets += [f"landings/{n}.dvc" for n in landings if (root / "landings" / f"{n}.dvc").is_file()]
    if versions is None or targets:
        _dvc_cli(root, "push", "-q", *targets)


def _pull_missing(root: Path, versions: list[str]) -> None:
    missing = [v for v in versions if not (root / "versions" / v / "manifest.json").is_file()]
    if missing and not has_remote(root):
        raise FileNotFoundError(f"versions/{missing[0]} is missing and the workspace has no DVC remote to pull it from")
    if missing:
        _dvc_cli(root, "pull", "-q", *[_target(root, v) for v in missing])


def checkout_version(root: Path, version: str) -> Path:
    """Make sure versions/<version> is present in the workspace (pulled from the remote if it
    was removed); it becomes the base of the next update."""
    root = Path(root).resolve()
    path = root / "versions" / version
    _pull_missing(root, [version])
    _pull_missing(root, chain(path))  # a delta is loaded against the versions it is stored on
    return path


def dag(root: Path) -> str:
    """The text of `dvc dag --outs`: every version with the landing(s) and parent it came from."""
    return _dvc_cli(Path(root), "dag", "--outs")


app = typer.Typer(add_completion=False, help=__doc__)


@app.command()
def init(workspace: Path = typer.Option(Path(".")), remote: str | None = None, endpoint_url: str | None = None) -> None:
    """Make WORKSPACE a git + DVC repo for a continual chain."""
    init_workspace(workspace, remote, endpoint_url)


@app.command(name="dag")
def dag_cmd(workspace: Path = typer.Option(Path("."))) -> None:
    """Print the chain's DAG."""
    typer.echo(dag(workspace))


if __name__ == "__main__":
    app()
