"""Step `evaluate`: score a version on its tasks (forgetting), write its row of the accuracy
matrix, and draw its picture.

Cost follows the work, not the history (DESIGN §8):
- `plan` decides which tasks must be re-scored. A merge moves an old task's ΔW only by what it
  truncated, which it measures exactly (the manifest's per-task relative ΔW error, worst layer),
  plus float32 rounding of the stored coefficients (≤ `FLOAT32_ROUNDING` relative per merge).
  Their sum since the task was last scored bounds how far its ΔW moved (triangle inequality). A
  task is *certified unchanged* — it keeps its recorded score — when that bound is at most
  `certify_tolerance` (1e-5) and its smallest top-1 logit margin when it was scored is at least
  `margin_floor` (1e-3): a 1e-5 relative change of a low-rank update shifts logits by orders of
  magnitude less than that margin, so no prediction can flip. Its head is never rewritten by a
  merge. Everything else (new tasks, tasks a merge truncated, mode `full`) is re-scored. The
  scheduled full re-evaluation (`compare`) audits every certificate.
- `score_tasks` loads the base model and the version once (cached per process) and scores the
  tasks' eval rows in mixed-task batches (one forward serves rows of different tasks), each
  task's eval data read once. The orchestrator shards the tasks over its workers.
- `summarize` writes evaluations/<version>.json: this version's scores, each task's first
  score (the matrix diagonal) and certificates, as a delta on the parent's record (only the
  entries of the tasks it scored or re-checked: O(work), not O(T)); the matrix is assembled from
  the per-version rows along the chain only when asked (`accuracy_matrix`). The picture is
  O(T) to draw: a heatmap of the recent versions × recent tasks, and every task's change
  since it was learned.

Why one module of ~640 lines: the certificate plan, the scoring and the record it writes share
the row-table format and the drift bound (changing one changes the others); the reports drawn from
the record (HEAD metrics, the matrix and the picture) are at the end.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import threading
from dataclasses import dataclass, field, fields
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import typer  # noqa: E402

from share_core import state as st  # noqa: E402
from share_core.base import load_base  # noqa: E402
from share_core.families import family  # noqa: E402
from share_core.model import ShareModel  # noqa: E402
from share_core.taskdata import EVAL_FILE, SPEC_FILE, TaskData, read_examples, read_task_spec  # noqa: E402

from .params import EvalParams, load_params  # noqa: E402
from .workspace import Workspace, write_atomic  # noqa: E402

FLOAT32_ROUNDING = 1.2e-7  # relative change of a ΔW from storing its coefficients in float32 once
SAFETY = 2.0  # a row is certified while its top-2 gap ≥ SAFETY × the gap change its drift can cause
MEASURABLE = 1e-5  # drift below which a gap change is rounding noise, not a measured sensitivity
MIN_MEASURED = 4  # rows measured before a task's own sensitivity replaces the prior
SENSITIVITY_FLOOR = 0.01  # a measured sensitivity is never taken below this × the prior
CHECKS = ("scored", "rows", "screened", "certified")  # how a task was checked, most work first
MAX_ROUNDS = 3  # sensitivity re-checks per evaluation before the rest of a task's rows are re-scored
RECENT = 20  # versions × tasks drawn as the heatmap
CELL_TEXT_MAX = 64  # cells of the heatmap with their value written in them


# ---- which tasks need scoring ------------------------------------------------------------------
@dataclass(frozen=True)
class EvaluationRecord:
    """evaluations/<version>.json, typed: the version's row of the accuracy matrix and how each
    task was checked. `results[task]` holds the task's score, majority baseline, margin, drift,
    check (one of CHECKS) and, with row certificates, where its row table lives (`rows_in`)."""

    version: str
    parent: str | None
    task: str  # the tasks this version added, comma-separated
    tasks: list[str]
    mode: str
    results: dict[str, dict]
    scores: dict[str, float | None]
    majority: dict[str, float | None]
    first_scores: dict[str, float | None]
    acc: float | None
    bwt: float
    rescored: list[str] | None = None  # None in records older than certificates: every task
    certified: list[str] = field(default_factory=list)
    checks: dict[str, int] = field(default_factory=dict)
    rows_rescored: int = 0

    def __post_init__(self) -> None:
        if self.rescored is None:
            object.__setattr__(self, "rescored", list(self.tasks))

    @classmethod
    def from_json(cls, data: dict) -> EvaluationRecord:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def to_json(self) -> dict:
        """The fields as they are (no deep copy, unlike dataclasses.asdict: ~0.1 s at T = 1,000); for json.dumps."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def carried(prev: dict, error: float) -> dict:
    """A task's entry carried one merge on, certified: its drift (and, with row tables, the
    cumulative drift its row certificates are checked against) grows by the merge's measured
    ΔW change plus float32 rounding. `plan` certifies with it; a delta record leaves out every
    entry it reproduces."""
    step = error + FLOAT32_ROUNDING
    entry = {**prev, "drift": prev["drift"] + step, "certified": True, "check": "certified", "rows_rescored": 0}
    if prev["score"] is not None and "rows_in" in prev:
        entry["cum_drift"] = prev["cum_drift"] + step
    return entry


# A record is written as a delta on its parent's record: the entries `carried` does not reproduce
# (tasks scored, re-checked or new here) and the version's scalars, so a landing writes O(tasks it
# touched) whatever the history. Reading one assembles it from the chain of records and the
# version's manifest (its task order and each task's measured error), once per file content
# (a landing reads its records a dozen times). Every RECORD_SNAPSHOT_EVERY-th record in a row is
# written whole.
RECORD_SNAPSHOT_EVERY = 32
RECORDS_CACHED = 8  # assembled records kept (least recently used out): ~1.2 MiB each at T = 1,000
_DERIVED = ("tasks", "results", "scores", "majority", "first_scores", "certified")
_RECORDS: dict[str, tuple[str, EvaluationRecord, int]] = {}  # path → (sha256 of its bytes, record, delta depth)


def read_record(ws: Workspace, version: str | None) -> EvaluationRecord | None:
    """The version's record, whole (a delta record is assembled along its chain), or None. The
    same object while the file's bytes are unchanged: treat it as read-only."""
    path = ws.evaluation_path(version) if version else None
    if not path or not path.is_file():
        return None
    raw = path.read_bytes()
    key = hashlib.sha256(raw).hexdigest()
    hit = _RECORDS.pop(str(path), None)
    if hit and hit[0] == key:
        _RECORDS[str(path)] = hit  # most recently used last
        return hit[1]
    data = json.loads(raw)
    record = _assemble(ws, data) if "base" in data else EvaluationRecord.from_json(data)
    _RECORDS[str(path)] = (key, record, data["base"]["depth"] if "base" in data else 0)
    while len(_RECORDS) > RECORDS_CACHED:
        _RECORDS.pop(next(iter(_RECORDS)))
    return record


def _expand(data: dict, parent: EvaluationRecord, manifest: st.Manifest) -> EvaluationRecord:
    errors = manifest.reconstruction_error
    tasks = manifest.task_names
    own = data["results"]
    results = {t: own[t] if t in own else carried(parent.results[t], errors[t]) for t in tasks}
    first = {t: parent.first_scores.get(t, results[t]["score"]) for t in tasks}
    rest = {k: v for k, v in data.items() if k not in ("base", "results")}
    return EvaluationRecord(
        **rest,
        tasks=tasks,
        results=results,
        scores={t: results[t]["score"] for t in tasks},
        majority={t: results[t]["majority"] for t in tasks},
        first_scores=first,
        certified=sorted(set(tasks) - set(data["rescored"])),
    )


def _assemble(ws: Workspace, data: dict) -> EvaluationRecord:
    base = data["base"]
    where = ws.evaluation_path(data["version"]).relative_to(ws.root)
    parent = read_record(ws, base["version"])  # its file's sha256 is then the cache's key
    if parent is None or _RECORDS[str(ws.evaluation_path(base["version"]))][0] != base["sha256"]:
        raise ValueError(
            f"{where} is a delta on a record of {base['version']} that is no longer there: re-evaluate "
            f"{data['version']} (python -m pipelines.evaluate {data['version']})"
        )
    try:
        manifest = st.read_manifest(ws.version_dir(data["version"]))
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{where} needs versions/{data['version']} (its task order and merge errors): restore the version first"
        ) from None
    return _expand(data, parent, manifest)


def _delta(ws: Workspace, record: EvaluationRecord, parent: EvaluationRecord | None, manifest: st.Manifest):
    """The record as a delta on `parent`'s (see RECORD_SNAPSHOT_EVERY), or None where it must be
    written whole: no parent record, a long run of deltas, or anything the delta would not
    reproduce exactly."""
    if parent is None or record.parent != parent.version or read_record(ws, parent.version) is not parent:
        return None
    sha256, _, depth = _RECORDS[str(ws.evaluation_path(parent.version))]
    if depth + 1 > RECORD_SNAPSHOT_EVERY:
        return None
    errors = manifest.reconstruction_error
    own = {
        t: e
        for t, e in record.results.items()
        if t not in parent.results or t not in errors or e != carried(parent.results[t], errors[t])
    }
    data = {k: v for k, v in record.to_json().items() if k not in _DERIVED}
    data["results"] = own
    data["base"] = {"version": parent.version, "sha256": sha256, "depth": depth + 1}
    try:
        same = _expand(data, parent, manifest) == record
    except KeyError:
        same = False
    return data if same else None


def remove_record(ws: Workspace, version: str) -> None:
    """A discarded version's evaluation record and row tables go (nothing else refers to them)."""
    ws.evaluation_path(version).unlink(missing_ok=True)
    rows_path(ws, version).unlink(missing_ok=True)


def rows_path(ws: Workspace, version: str) -> Path:
    """evaluations/<version>.rows.json: the row tables of the tasks whose rows were (re)scored in
    `version` (append-only: a version writes only the tables it changed)."""
    return ws.evaluations / f"{version}.rows.json"


def prior_sensitivity(cfg: EvalParams) -> float:
    """A task's assumed sensitivity (top-2 logit gap change per unit relative ΔW drift) until it
    is measured: the ratio the task-level rule has always used (margin_floor / certify_tolerance)."""
    return cfg.margin_floor / cfg.certify_tolerance


def sensitivity(entry: dict, cfg: EvalParams) -> float:
    """The sensitivity a task's rows are certified with: the prior until MIN_MEASURED rows have
    been measured at a drift ≥ MEASURABLE, then the largest ratio ever measured (never below
    SENSITIVITY_FLOOR × the prior: a change below rounding still bounds nothing)."""
    prior = prior_sensitivity(cfg)
    if entry.get("sensitivity_rows", 0) < MIN_MEASURED:
        return prior
    return max(entry["sensitivity_max"], SENSITIVITY_FLOOR * prior)


def _read_rows(ws: Workspace, version: str, task: str, files: dict[str, dict]) -> dict:
    """A copy of `task`'s row table as `version` wrote it (files: the row files read so far)."""
    if version not in files:
        files[version] = json.loads(rows_path(ws, version).read_text())
    return {k: list(x) for k, x in files[version][task].items()}


def _budget(margin: float | None, sigma: float) -> float:
    """How much more drift a row scored with top-2 gap `margin` takes before it could flip:
    margin / (SAFETY · σ); a row with a single output (no margin) never flips."""
    return math.inf if margin is None else margin / (SAFETY * sigma)


def _expires(table: dict, sigma: float) -> float:
    """The task's cumulative drift at which its first row's certificate expires."""
    return min((at + _budget(m, sigma) for m, at in zip(table["margin"], table["at"])), default=math.inf)


def _due(table: dict, cum: float, sigma: float, skip: set[int] = frozenset()) -> list[int]:
    return [
        i
        for i, (m, at) in enumerate(zip(table["margin"], table["at"]))
        if i not in skip and cum - at > _budget(m, sigma)
    ]


def _measure(entry: dict, table: dict, idx: list[int], rows: dict, cum: float) -> None:
    """Update a task's measured sensitivity (entry's sensitivity_max / sensitivity_rows) from
    re-scored rows `idx` (their new values and margins in `rows`) against the row table they were
    certified from, at the task's cumulative drift `cum`: each row's gap change over its drift."""
    for i, v, m in zip(idx, rows["value"], rows["margin"]):
        d, old = cum - table["at"][i], table["margin"][i]
        if d >= MEASURABLE and old is not None and m is not None:
            change = abs(m - old) if v == table["value"][i] else m + old  # a flip moved the gap through 0
            entry["sensitivity_max"] = max(entry.get("sensitivity_max", 0.0), change / d)
            entry["sensitivity_rows"] = entry.get("sensitivity_rows", 0) + 1


def plan(ws: Workspace, version: str, cfg: EvalParams, full: bool = False) -> dict:
    """{"score": tasks to re-score in full, "certified": {task: its entry}} for `version`.

    A task's entry says how it was checked ("check"): "certified" (every row's certificate
    holds: its recorded score is kept), "rows" (the rows whose certificate expired were re-scored
    here, the others certified: the score is exact unless a certificate is wrong), "screened"
    (only screening rows were re-scored). Re-scoring those rows happens here, in this process
    (one load, shared with the build): it is what keeps a saturated stream's evaluation bounded.
    New tasks, tasks whose every row expired and tasks without row tables are in "score"."""
    manifest = st.read_manifest(ws.version_dir(version))
    tasks = manifest.task_names
    parent = read_record(ws, manifest.parent)
    if full or cfg.mode == "full" or parent is None:
        return {"score": tasks, "certified": {}}
    added = set(manifest.added)
    errors = manifest.reconstruction_error
    files: dict[str, dict] = {}

    def table(t: str, entry: dict) -> dict:
        return _read_rows(ws, entry["rows_in"], t, files)

    score, certified, due, tables = [], {}, {}, {}
    for t in tasks:
        prev = parent.results.get(t)
        if t in added or prev is None or t not in errors:
            score.append(t)
            continue
        entry = carried(prev, errors[t])
        if prev["score"] is None:
            certified[t] = entry
            continue
        if "rows_in" not in prev:  # a record from before row certificates: the task-level rule
            margin = prev.get("margin")
            if entry["drift"] <= cfg.certify_tolerance and margin is not None and margin >= cfg.margin_floor:
                certified[t] = entry
            else:
                score.append(t)
            continue
        sigma = sensitivity(prev, cfg)
        stale = sigma != prev["sensitivity"]  # the params' prior changed since the expiry was computed
        if stale or entry["cum_drift"] > prev["expires"]:  # some row's certificate may have expired: which ones
            tb = table(t, prev)
            rows = _due(tb, entry["cum_drift"], sigma)
            if stale:
                entry.update(sensitivity=sigma, expires=_expires(tb, sigma))
            if len(rows) == len(tb["margin"]):
                score.append(t)
                continue
            if rows:
                due[t], tables[t] = rows, tb
        certified[t] = entry
    # the screen: a seeded sample of certified rows of tasks this merge truncated, re-scored to
    # measure each one's sensitivity (a certificate that would have been wrong shows up here)
    moved = sorted(t for t, e in certified.items() if errors.get(t, 0.0) >= MEASURABLE and "rows_in" in e)
    rng = random.Random(manifest.content_hash)
    screened: dict[str, list[int]] = {}
    for t in rng.sample(moved, min(cfg.screen_rows, len(moved))):
        if t not in tables:
            tables[t] = table(t, certified[t])
        left = sorted(set(range(len(tables[t]["margin"]))) - set(due.get(t, [])))
        if left:
            screened[t] = [rng.choice(left)]
    if due or screened:
        _check_rows(ws, version, cfg, certified, tables, due, screened)
    return {"score": score, "certified": certified}


def _check_rows(
    ws: Workspace,
    version: str,
    cfg: EvalParams,
    certified: dict[str, dict],
    tables: dict[str, dict],
    due: dict[str, list[int]],
    screened: dict[str, list[int]],
) -> None:
    """Re-score the due and screened rows (one mixed batch over every task), update each task's
    row table, its measured sensitivity and its entry; when a measurement raises a task's
    sensitivity, the rows it no longer certifies are re-scored in a further round."""
    pending = {t: sorted(set(due.get(t, [])) | set(screened.get(t, []))) for t in set(due) | set(screened)}
    done: dict[str, set[int]] = {t: set() for t in pending}
    for rnd in range(MAX_ROUNDS + 1):
        if not pending:
            break
        fresh = {r["task"]: r for r in score_tasks(ws, version, list(pending), rows=pending)}
        nxt = {}
        for t, idx in pending.items():
            e, tb, cum = certified[t], tables[t], certified[t]["cum_drift"]
            old_sigma = sensitivity(e, cfg)
            rows = fresh[t]["rows"]
            _measure(e, tb, idx, rows, cum)
            for i, v, m in zip(idx, rows["value"], rows["margin"]):
                tb["value"][i], tb["margin"][i], tb["at"][i] = v, m, cum
            done[t] |= set(idx)
            sigma = sensitivity(e, cfg)
            if sigma > old_sigma:  # certified with too small a sensitivity: check the rest again
                again = _due(tb, cum, sigma, skip=done[t])
                if again:
                    nxt[t] = again if rnd < MAX_ROUNDS - 1 else sorted(set(range(len(tb["margin"]))) - done[t])
        pending = nxt
    for t, rescored in done.items():
        e, tb = certified[t], tables[t]
        values = [v for v in tb["value"] if v is not None]
        e["score"] = sum(values) / len(values) if values else None
        margins = [m for m in tb["margin"] if m is not None]
        e["margin"] = min(margins) if margins else None
        e["rows_rescored"] = len(rescored)
        e["check"] = "screened" if rescored == set(screened.get(t, [])) else "rows"
        e["sensitivity"] = sensitivity(e, cfg)
        e["expires"] = _expires(tb, e["sensitivity"])
        e["drift"] = e["cum_drift"] - min(tb["at"])
        e["_rows"] = tb  # written by summarize into this version's row tables


def shards(tasks: list[str], n: int) -> list[list[str]]:
    """`tasks` in at most n contiguous shards of near-equal size."""
    n = max(1, min(n, len(tasks)))
    size = math.ceil(len(tasks) / n) if tasks else 0
    return [tasks[i : i + size] for i in range(0, len(tasks), size)] if tasks else []


# ---- scoring: load once, mixed-task batches -----------------------------------------------------
SCORING = (
    threading.Lock()
)  # a mixed batch sets per-row task ids on the cached model's layers: one scoring at a time per process


_LOADED: dict[tuple[str, str, str], tuple] = {}  # one entry: the version this process scored or built last
_LOADED_LOCK = threading.Lock()
_LOAD_COUNT = [0]


def loaded(root: str, version: str, content_hash: str):
    """(ShareModel, tokenizer, params) of one version, loaded once per process (a worker keeps
    the last version it scored; content_hash makes a rebuilt version a new key). A process that
    has just built the version (`seed_loaded`, from `pipelines.update.build_version`) hands its
    model over instead, so a landing loads its version once: the build loads the parent, the
    evaluation reuses what the build made."""
    key = (str(root), version, content_hash)
    with _LOADED_LOCK:
        hit = _LOADED.get(key)
        if hit is not None:
            return hit
        ws = Workspace(Path(root))
        params = load_params(ws.params_path)
        model, tok = load_base(params.base, params.train.seed)
        share = ShareModel(model, st.load(ws.version_dir(version))).eval()
        _LOAD_COUNT[0] += 1
        _LOADED.clear()
        _LOADED[key] = (share, tok, params)
        return _LOADED[key]


def seed_loaded(root: str, version: str, content_hash: str, share: ShareModel, tok, params) -> None:
    """Make `share` (a ShareModel whose state was just saved as `version` with `content_hash`)
    what `loaded` returns for that key: no second load of the version in this process."""
    if share.state.content_hash != content_hash:
        raise ValueError(f"{version}: the model's state is {share.state.content_hash}, not {content_hash}")
    share.activate(None)
    share.eval()
    with _LOADED_LOCK:
        _LOADED.clear()
        _LOADED[(str(root), version, content_hash)] = (share, tok, params)


def release_loaded() -> None:
    """Drop the version this process kept: a build calls it before loading its parent, so that a
    landing never holds two versions' models (the last one scored and the one being built)."""
    with _LOADED_LOCK:
        _LOADED.clear()


def loads() -> int:
    """How many versions this process loaded from disk for evaluation (a counter for tests and benchmarks)."""
    return _LOAD_COUNT[0]


def eval_data(ws: Workspace, entry: st.TaskEntry) -> TaskData | None:
    """A task's eval rows from its ingested landing (None when it brought none)."""
    landing = ws.landings / entry.info.get("landing", entry.name)
    if not (landing / EVAL_FILE).is_file():
        return None
    spec = read_task_spec(landing / SPEC_FILE)
    return TaskData(spec=spec, train=[], eval=read_examples(landing / EVAL_FILE, spec), root=landing)


def score_tasks(ws: Workspace, version: str, tasks: list[str], rows: dict[str, list[int]] | None = None) -> list[dict]:
    """[{"task", "score", "majority", "margin", "rows"}] for `tasks` of `version` (score None: no
    eval data; majority: the family's trivial baseline). margin: the smallest gap between the top
    two logits behind any prediction of the task (see share_core.families); rows: every scored
    row's metric and margin ({"value": [...], "margin": [...]}, None for a margin-less row).
    With `rows`, only those eval rows (indices) of the tasks it names are scored (score: their mean)."""
    manifest = st.read_manifest(ws.version_dir(version))
    share, tok, params = loaded(str(ws.root), version, manifest.content_hash)
    fam = family(params.base.family)
    entries = {t.name: t for t in manifest.tasks}
    items, baselines = [], {}
    for t in tasks:
        data = eval_data(ws, entries[t])
        if data is not None and data.eval:
            baselines[t] = fam.baseline(data)
            if baselines[t] is None:  # no trivial predictor: the untrained base's score, measured at landing
                baselines[t] = entries[t].info.get("baseline")
            picked = data.eval if rows is None or t not in rows else [data.eval[i] for i in rows[t]]
            items += [(t, data.spec, row) for row in picked]
    cfg = params.evaluate
    with SCORING:
        scores = fam.score(
            share,
            tok,
            items,
            max_length=params.train.max_length,
            batch_size=cfg.batch_size,
            max_new_tokens=cfg.max_new_tokens,
        )
    out = []
    for t in tasks:
        if t not in scores:
            out.append({"task": t, "score": None, "majority": None, "margin": None, "rows": None})
            continue
        r = scores[t]
        margins = [None if m == math.inf else m for m in r["margins"]]
        out.append(
            {
                "task": t,
                "score": r["score"],
                "majority": baselines[t],
                "margin": r["margin"],
                "rows": {"value": r["values"], "margin": margins},
            }
        )
    return out


# ---- the version's record --------------------------------------------------------------------
def _mean(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def summarize(
    ws: Workspace,
    version: str,
    scored: list[dict],
    certified: dict[str, dict] | None = None,
    mode: str = "changed-only",
) -> EvaluationRecord:
    """Write the version's evaluation record (a delta where one reproduces it) and picture;
    return the record."""
    manifest = st.read_manifest(ws.version_dir(version))
    tasks = manifest.task_names
    cfg = load_params(ws.params_path).evaluate
    parent = read_record(ws, manifest.parent)
    before = parent.results if parent else {}
    errors = manifest.reconstruction_error
    results, tables, files = {}, {}, {}
    for r in scored:
        entry = {
            "score": r["score"],
            "majority": r["majority"],
            "margin": r.get("margin"),
            "drift": 0.0,
            "certified": False,
            "scored_in": version,
            "check": "scored",
        }
        if r.get("rows"):  # every row scored here: its row table starts now (cumulative drift 0)
            prev = before.get(r["task"], {})
            measured = {k: prev[k] for k in ("sensitivity_max", "sensitivity_rows") if k in prev}
            if "rows_in" in prev and r["task"] in errors:  # re-scored after a merge moved it: measure
                old = _read_rows(ws, prev["rows_in"], r["task"], files)
                if len(old["value"]) == len(r["rows"]["value"]):
                    cum = prev["cum_drift"] + errors[r["task"]] + FLOAT32_ROUNDING
                    _measure(measured, old, list(range(len(old["value"]))), r["rows"], cum)
            tb = {"value": list(r["rows"]["value"]), "margin": list(r["rows"]["margin"])}
            tb["at"] = [0.0] * len(tb["value"])
            entry.update(measured, cum_drift=0.0, rows_rescored=len(tb["value"]))
            entry["sensitivity"] = sensitivity(entry, cfg)
            entry["expires"] = _expires(tb, entry["sensitivity"])
            tables[r["task"]] = tb
        results[r["task"]] = entry
    for t, e in (certified or {}).items():
        e = dict(e)
        if "_rows" in e:
            tables[t] = e.pop("_rows")
        results[t] = e
    for t, tb in tables.items():
        results[t]["rows_in"] = version
    missing = set(tasks) - set(results)
    if missing:
        raise ValueError(f"{version}: no evaluation result for tasks {sorted(missing)}")
    first = dict(parent.first_scores) if parent else {}
    for t in tasks:
        first.setdefault(t, results[t]["score"])
    added = manifest.added
    drops = [
        results[t]["score"] - first[t]
        for t in tasks
        if t not in added and results[t]["score"] is not None and first.get(t) is not None
    ]
    record = EvaluationRecord(
        version=version,
        parent=manifest.parent,
        task=",".join(added),
        tasks=tasks,
        mode=mode,
        results={t: results[t] for t in tasks},
        scores={t: results[t]["score"] for t in tasks},
        majority={t: results[t]["majority"] for t in tasks},
        first_scores={t: first[t] for t in tasks},
        rescored=sorted(r["task"] for r in scored),
        certified=sorted(certified or {}),
        checks={c: sum(results[t].get("check") == c for t in tasks) for c in CHECKS},
        rows_rescored=sum(results[t].get("rows_rescored", 0) for t in tasks if results[t].get("check") != "certified"),
        acc=_mean(results[t]["score"] for t in tasks),
        bwt=sum(drops) / len(drops) if drops else 0.0,
    )
    ws.evaluations.mkdir(exist_ok=True)
    if tables:
        write_atomic(rows_path(ws, version), json.dumps(tables, separators=(",", ":")))
    picture(ws, record, ws.evaluations / f"{version}.png")
    # written twice per landing (here and as the run's MLflow artifact): a delta where one reproduces it
    data = _delta(ws, record, parent, manifest) or record.to_json()
    write_atomic(ws.evaluation_path(version), json.dumps(data, separators=(",", ":")))
    return record


HISTORY_COLUMNS = ("step", "version", "acc", "bwt", "tasks", "rescored", "certified")


def publish_head(ws: Workspace, version: str) -> None:
    """What DVC reports for the workspace (`dvc metrics show`, `dvc plots show`): HEAD's metrics,
    one history row per HEAD move (added once: a resumed step does not repeat it) and HEAD's
    picture. Each file is replaced atomically (the history is a few dozen bytes per version)."""
    rec = read_record(ws, version)
    if rec is None:
        raise FileNotFoundError(f"{version} has no evaluation record")
    summary = {
        "version": version,
        "acc": rec.acc,
        "bwt": rec.bwt,
        "tasks": len(rec.tasks),
        "rescored": len(rec.rescored),
        "certified": len(rec.certified),
    }  # records before certificates re-scored everything
    write_atomic(ws.head_metrics_path, json.dumps(summary, indent=1))
    lines = ws.history_path.read_text().splitlines() if ws.history_path.is_file() else []
    lines = [",".join(HISTORY_COLUMNS)] + [ln for ln in lines[1:] if len(ln.split(",")) == len(HISTORY_COLUMNS)]
    if lines[-1].split(",")[1:2] != [version]:
        row = {
            **summary,
            "step": len(lines),
            "acc": "" if rec.acc is None else f"{rec.acc:.6f}",
            "bwt": f"{rec.bwt:.6f}",
        }
        write_atomic(ws.history_path, "\n".join(lines + [",".join(str(row[c]) for c in HISTORY_COLUMNS)]) + "\n")
    picture_path = ws.evaluations / f"{version}.png"
    if picture_path.is_file():
        write_atomic(ws.heatmap_path, picture_path.read_bytes())


def evaluate_version(ws: Workspace, version: str, full: bool = False) -> EvaluationRecord:
    """Score what `plan` says (in this process, one load) and summarize."""
    cfg = load_params(ws.params_path).evaluate
    p = plan(ws, version, cfg, full)
    return summarize(
        ws,
        version,
        score_tasks(ws, version, p["score"]),
        p["certified"],
        "full" if full or cfg.mode == "full" else cfg.mode,
    )


def compare(recorded: EvaluationRecord, fresh: list[dict], tolerance: float = 1e-6) -> dict:
    """Audit a record against a full re-scoring: every task whose score moved, and which of
    those were certified unchanged (a certificate that was wrong)."""
    diffs = {}
    for r in fresh:
        old = recorded.scores.get(r["task"])
        if r["score"] is not None and old is not None and abs(r["score"] - old) > tolerance:
            diffs[r["task"]] = {
                "recorded": old,
                "now": r["score"],
                "certified": r["task"] in recorded.certified,
            }
    worst = max((abs(d["now"] - d["recorded"]) for d in diffs.values()), default=0.0)
    return {
        "version": recorded.version,
        "matches": not diffs,
        "worst_abs_diff": worst,
        "disagreements": diffs,
        "certificates_checked": len(recorded.certified),
        "certificates_wrong": sorted(t for t, d in diffs.items() if d["certified"]),
        "scores": {r["task"]: r["score"] for r in fresh},
    }


def accuracy_matrix(ws: Workspace, version: str, last: int | None = None, tasks: list[str] | None = None) -> dict:
    """R[i][j] along the chain ending at `version` (its last `last` versions; columns `tasks`,
    default every task of `version`), assembled from the per-version records:
    {"versions", "tasks", "rows"} (None: not learned yet / no data)."""
    records, v = [], version
    while v and (last is None or len(records) < last):
        rec = read_record(ws, v)
        if rec is None:
            break
        records.append(rec)
        v = rec.parent
    records.reverse()
    tasks = tasks if tasks is not None else (records[-1].tasks if records else [])
    rows = [[rec.scores.get(t) for t in tasks] for rec in records]
    return {"versions": [r.version for r in records], "tasks": tasks, "rows": rows}


def picture(ws: Workspace, record: EvaluationRecord, path: Path) -> None:
    """Left: R[i][j] for the last RECENT versions × the last RECENT tasks (values written in
    the cells). Right: every task's score now minus when it was learned (one point per task)."""
    tasks = record.tasks[-RECENT:]
    m = accuracy_matrix(ws, record.parent, RECENT - 1, tasks) if record.parent else {"versions": [], "rows": []}
    versions = m["versions"] + [record.version]
    grid = [[float("nan") if s is None else s for s in row] for row in m["rows"] + [[record.scores[t] for t in tasks]]]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 5.5), gridspec_kw={"width_ratios": [1.2, 1]})
    im = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    if len(grid) * len(tasks) <= CELL_TEXT_MAX:  # values written in the cells of a small grid (text layout is slow)
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                if v == v:
                    ax.text(
                        j, i, f"{v:.2f}", ha="center", va="center", color="white" if v < 0.6 else "black", fontsize=7
                    )
    ax.set_xticks(range(len(tasks)), tasks, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(versions)), versions, fontsize=7)
    ax.set_xlabel(f"evaluated on task (last {len(tasks)} of {len(record.tasks)})")
    ax.set_ylabel("after version")
    fig.colorbar(im, ax=ax, fraction=0.046)
    drops = [
        (i, record.scores[t] - record.first_scores[t])
        for i, t in enumerate(record.tasks)
        if record.scores[t] is not None and record.first_scores.get(t) is not None
    ]
    certified = set(record.certified)
    for flag, color, label in ((False, "tab:blue", "re-scored"), (True, "tab:gray", "certified unchanged")):
        pts = [(i, d) for i, d in drops if (record.tasks[i] in certified) == flag]
        if pts:
            ax2.scatter([p[0] for p in pts], [100 * p[1] for p in pts], s=8, color=color, label=label)
    ax2.axhline(0.0, color="black", lw=0.8)
    ax2.set_xlabel("task (in the order learned)")
    ax2.set_ylabel("score now − when learned (points)")
    ax2.legend(loc="lower left", fontsize=8)
    acc = "n/a" if record.acc is None else f"{record.acc:.3f}"
    fig.suptitle(
        f"{record.version}: {len(record.tasks)} tasks, ACC {acc}, BWT {record.bwt:+.3f}; re-scored "
        f"{len(record.rescored)}, certified {len(record.certified)}"
    )
    fig.subplots_adjust(left=0.1, right=0.98, bottom=0.22, top=0.9, wspace=0.3)  # fixed: tight_layout costs ~1 s
    fig.savefig(path, dpi=90)
    plt.close(fig)


app = typer.Typer(add_completion=False, help=__doc__)


@app.command()
def main(
    versions: list[str],
    workspace: Path = typer.Option(Path(".")),
    full: bool = typer.Option(False, help="re-score every task (no certificates)"),
) -> None:
    """Evaluate each of VERSIONS, in order (one process: the base model loads once); write
    evaluations/<version>.json and .png."""
    for version in versions:
        rec = evaluate_version(Workspace(workspace), version, full)
        typer.echo(
            json.dumps(
                {k: getattr(rec, k) for k in ("version", "acc", "bwt", "scores", "rescored", "certified")}, indent=2
            )
        )


if __name__ == "__main__":
    app()
