"""Step `validate`: check a downloaded landing completely before anything changes.

Everything from a bucket is untrusted. A landing is refused, with one reason naming the file
and what was expected, when: its object names are not plain file names or not the files its
kind allows (pickles included), task.yaml is malformed or names another task, the task
already exists in the chain, the data rows are malformed or too few, or an adapter is
unreadable, non-finite, or made for another base model, other target modules, other heads,
other layer shapes or another label count. Nothing here writes anything. Every reason is
at most MAX_REASON characters and names files relative to the landing (never a host path).
"""

from __future__ import annotations

from pathlib import Path

import typer

from share_core import state as st
from share_core.base import BaseSpec
from share_core.families import family
from share_core.model import check_adapter_fits
from share_core.peft_io import TASK_CARD, AdapterError, read_adapter
from share_core.state import read_manifest
from share_core.taskdata import (
    EVAL_FILE,
    SPEC_FILE,
    TaskFormatError,
    TaskSpec,
    load_task,
    read_examples,
    read_task_spec,
)

from .params import load_params
from .storage import SAFE_NAME
from .workspace import MAX_REASON, bound_text

ALLOWED = {
    "dataset": ({SPEC_FILE, "train.jsonl", EVAL_FILE}, {"README.md"}),
    "adapter": ({SPEC_FILE, "adapter_config.json", "adapter_model.safetensors"}, {EVAL_FILE, "README.md", TASK_CARD}),
}
MAX_FILE_BYTES = 200 * 1024 * 1024
MIN_TRAIN_ROWS = 8


class LandingRejected(ValueError):
    """The landing is refused; `reason` says why, naming the file or field (at most
    MAX_REASON characters)."""

    def __init__(self, reason: str) -> None:
        reason = bound_text(reason, MAX_REASON)
        super().__init__(reason)
        self.reason = reason


def landing_reason(message: str, local: Path) -> str:
    """`message` with the landing's local directory removed (files named relative to the
    landing; the directory itself as "<landing>") and bounded to MAX_REASON characters."""
    text = str(message)[: 64 * MAX_REASON]  # bounded work whatever the message's size
    for d in sorted({str(local), str(Path(local).resolve())}, key=len, reverse=True):
        text = text.replace(d + "/", "").replace(d, "<landing>")
    return bound_text(text, MAX_REASON)


def check_names(names: list[str], kind: str) -> None:
    """Plain file names only, exactly the files this kind of landing may carry."""
    if kind not in ALLOWED:
        raise LandingRejected(f"unknown landing kind {kind!r}; expected one of {sorted(ALLOWED)}")
    for name in names:
        if not SAFE_NAME.match(name) or ".." in name:
            raise LandingRejected(f"object name {name!r} is not a plain file name (no '/', '..', or leading dot)")
        if name.endswith((".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")):
            raise LandingRejected(
                f"{name}: pickle-based weights are refused (unsafe to load); upload adapter_model.safetensors"
            )
    required, optional = ALLOWED[kind]
    other = next(k for k in ALLOWED if k != kind)
    if kind == "dataset" and {"adapter_config.json", "adapter_model.safetensors"} & set(names):
        raise LandingRejected(
            "this is an adapter (adapter_config.json / adapter_model.safetensors), landed as a dataset: land it "
            "with `share land DIR --kind adapter` (it goes under incoming/adapters/<task>/)"
        )
    if kind == "adapter" and "train.jsonl" in names and "adapter_config.json" not in names:
        raise LandingRejected(
            f"this is a dataset (train.jsonl), landed as an {kind}: land it with `share land DIR --kind {other}` "
            "(the default; it goes under incoming/datasets/<task>/)"
        )
    missing = sorted(required - set(names))
    if missing:
        raise LandingRejected(f"{kind} landing is missing {missing} (a {kind} needs {sorted(required)})")
    extra = sorted(set(names) - required - optional)
    if extra:
        raise LandingRejected(
            f"unexpected file(s) {extra} in a {kind} landing (allowed: {sorted(required | optional)})"
        )


def _check_sizes(local: Path, names: list[str]) -> None:
    for name in names:
        size = (local / name).stat().st_size
        if size > MAX_FILE_BYTES:
            raise LandingRejected(f"{name}: {size} bytes is over the {MAX_FILE_BYTES}-byte limit")
        if size == 0:
            raise LandingRejected(f"{name}: empty file")


def _check_spec(local: Path, task: str, manifest: st.Manifest | None, base: BaseSpec) -> TaskSpec:
    spec = read_task_spec(local / SPEC_FILE)
    if spec.name != task:
        raise LandingRejected(f"{SPEC_FILE}: name {spec.name!r} differs from the landing's directory {task!r}")
    if spec.type != base.family:
        raise LandingRejected(
            f"{SPEC_FILE}: type {spec.type!r} does not match this workspace's base model {base.model_id!r}, "
            f"which serves {base.family!r} tasks (base.family in params.yaml)"
        )
    if manifest and spec.name in manifest.task_names:
        raise LandingRejected(f"task {spec.name!r} already exists in the current version; land it under a new name")
    return spec


def _check_dataset(local: Path) -> None:
    data = load_task(local)
    if len(data.train) < MIN_TRAIN_ROWS:
        raise LandingRejected(f"train.jsonl: {len(data.train)} rows; at least {MIN_TRAIN_ROWS} are needed")
    try:
        family(data.spec.type).check_train(data)
    except ValueError as e:
        raise LandingRejected(f"train.jsonl: {e}") from None


def _check_adapter(local: Path, spec: TaskSpec, manifest: st.Manifest | None, base: BaseSpec) -> None:
    adapter = read_adapter(local, name=spec.name)
    fam = family(base.family)
    if adapter.task_type and fam.peft_task_type and adapter.task_type != fam.peft_task_type:
        raise LandingRejected(
            f"adapter_config.json: task_type {adapter.task_type!r} does not match this workspace's {base.family!r} "
            f"base model (expected {fam.peft_task_type!r})"
        )
    if manifest:
        shapes = {name: (t["n"], t["d"]) for name, t in manifest.layers.items()}
        check_adapter_fits(
            adapter,
            manifest.base_model["id"],
            manifest.target_modules,
            manifest.head_modules,
            shapes,
            exact_layers=True,
        )
    else:  # the first version: the layers' shapes are checked when the subspace is built
        check_adapter_fits(adapter, base.model_id, base.targets(), base.heads())
    _check_head_and_eval(local, adapter, spec, fam)


def _check_head_and_eval(local: Path, adapter, spec: TaskSpec, fam) -> None:
    """An adapter's head has an output per label (when the family has labels), and its optional
    eval.jsonl reads under the task's spec: the same before upload and in the workspace."""
    expected = fam.num_labels(spec)
    outs = {v.shape[0] for k, v in adapter.heads.items() if k.endswith(".weight") and v.ndim == 2}
    if expected is not None and expected not in outs:
        raise LandingRejected(
            f"adapter_model.safetensors: no head layer has {expected} outputs for labels {list(spec.labels)} (found "
            f"{sorted(outs)})"
        )
    if (local / EVAL_FILE).is_file():
        read_examples(local / EVAL_FILE, spec)


def validate_landing(
    local: Path, kind: str, task: str, manifest: st.Manifest | None, base: BaseSpec, names: list[str] | None = None
) -> TaskSpec:
    """Check a landing downloaded to `local` against the workspace's base model and family and
    the current version's `manifest` (None: the chain is empty). `names`: the landing's object
    names as listed in storage (default: the files in `local`). Returns its TaskSpec; raises
    LandingRejected."""
    local = Path(local)
    names = sorted(names if names is not None else (p.name for p in local.iterdir()))
    check_names(names, kind)
    try:
        _check_sizes(local, names)
        spec = _check_spec(local, task, manifest, base)
        if kind == "dataset":
            _check_dataset(local)
        else:
            _check_adapter(local, spec, manifest, base)
    except (
        TaskFormatError,
        AdapterError,
        ValueError,
    ) as e:  # ValueError: the base model's own config (e.g. no default targets)
        if isinstance(e, LandingRejected):
            raise
        raise LandingRejected(landing_reason(str(e), local)) from None
    return spec


def precheck_landing(local: Path, kind: str, task: str) -> TaskSpec:
    """The checks a landing passes before it is uploaded (`share land`), without a workspace:
    the same names, sizes, task.yaml, data rows and labels as `validate_landing`, the adapter's
    safetensors, PEFT task type and head size judged against the task's own type. What needs the
    workspace (its base model and family, the tasks already in the chain, the adapter's layer
    shapes) is checked when the landing is processed. Raises LandingRejected."""
    local = Path(local)
    names = sorted(p.name for p in local.iterdir())
    check_names(names, kind)
    try:
        _check_sizes(local, names)
        spec = read_task_spec(local / SPEC_FILE)
        if spec.name != task:
            raise LandingRejected(f"{SPEC_FILE}: name {spec.name!r} differs from the landing's directory {task!r}")
        fam = family(spec.type)
        if kind == "dataset":
            _check_dataset(local)
            return spec
        adapter = read_adapter(local, name=spec.name)
        if adapter.task_type and fam.peft_task_type and adapter.task_type != fam.peft_task_type:
            raise LandingRejected(
                f"adapter_config.json: task_type {adapter.task_type!r} does not match the task's type {spec.type!r} "
                f"(expected {fam.peft_task_type!r})"
            )
        _check_head_and_eval(local, adapter, spec, fam)
        return spec
    except (TaskFormatError, AdapterError, ValueError) as e:
        if isinstance(e, LandingRejected):
            raise
        raise LandingRejected(landing_reason(str(e), local)) from None


app = typer.Typer(add_completion=False, help=__doc__)


@app.command()
def main(
    landing: Path,
    kind: str = typer.Option(..., help="dataset | adapter"),
    params: Path = typer.Option(Path("params.yaml"), help="the workspace's params.yaml (its base section)"),
    version: Path | None = typer.Option(None, help="current version dir"),
) -> None:
    """Validate a landing directory; exit 1 with the reason when it is refused."""
    try:
        spec = validate_landing(
            landing, kind, landing.name, read_manifest(version) if version else None, load_params(params).base
        )
    except LandingRejected as e:
        typer.echo(f"rejected: {e.reason}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"ok: {kind} {spec.name} ({spec.type})")


if __name__ == "__main__":
    app()
