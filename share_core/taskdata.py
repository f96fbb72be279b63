"""The task format of the storage contract (DESIGN §4): ``task.yaml`` + ``train.jsonl`` + ``eval.jsonl``.

Shared by training, the pipeline's validator and the task generator, so that whatever one side
writes the other accepts. Everything that arrives from a bucket is untrusted: every check raises
`TaskFormatError` naming the file (and line) and what was expected, so a rejected landing can be
reported as is. Limits: task.yaml at most MAX_SPEC_BYTES and without YAML anchors/aliases (no
alias expansion, so no alias bomb); each JSONL line at most MAX_LINE_BYTES (checked before it is
parsed) and each text value at most MAX_TEXT_BYTES, both overridable per call or with the
environment variables SHARE_MAX_LINE_BYTES / SHARE_MAX_TEXT_BYTES (set them alike for every
process of a chain: validation and training must agree).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import reprlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import yaml

SPEC_FILE, TRAIN_FILE, EVAL_FILE = "task.yaml", "train.jsonl", "eval.jsonl"
TASK_FILES = (SPEC_FILE, TRAIN_FILE, EVAL_FILE)
CLASSIFICATION, CAUSAL_LM = "sequence-classification", "causal-lm"
# What each task type's task.yaml and rows carry. The task families (share_core.families) own
# these and register them when share_core is imported: `fields` are the TaskSpec attributes that
# name a row's keys, `metrics` the allowed metrics (the first is the default), `labelled` whether
# the type has a label set (its last field is then the label).
METRICS: dict[str, tuple[str, ...]] = {}
FIELDS: dict[str, tuple[str, ...]] = {}
LABELLED: set[str] = set()


def register_task_type(name: str, fields: tuple[str, ...], metrics: tuple[str, ...], labelled: bool) -> None:
    """Make task type `name` known to the task format (called by share_core.families)."""
    FIELDS[name], METRICS[name] = tuple(fields), tuple(metrics)
    (LABELLED.add if labelled else LABELLED.discard)(name)


NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
MAX_SPEC_BYTES = 64 * 1024  # a spec is a handful of fields; anything bigger is not one
MAX_TEXT_BYTES = 64 * 1024  # one example's text value (UTF-8 bytes)
MAX_LINE_BYTES = 256 * 1024  # one JSONL line (one example with all its fields)
_repr = reprlib.Repr()
_repr.maxstring, _repr.maxother, _repr.maxlist, _repr.maxdict, _repr.maxlevel = 80, 80, 8, 8, 2
_brief = _repr.repr  # values quoted in messages: short whatever their size


class TaskFormatError(ValueError):
    """A task file is missing or malformed; the message names the file and the field."""


def row_limits(max_text_bytes: int | None = None, max_line_bytes: int | None = None) -> tuple[int, int]:
    """(text, line) byte limits: the arguments, else SHARE_MAX_TEXT_BYTES / SHARE_MAX_LINE_BYTES,
    else the defaults. The line limit is never below the text limit."""

    def pick(value: int | None, env: str, default: int) -> int:
        if value is None:
            raw = os.environ.get(env, "").strip()
            try:
                value = int(raw) if raw else default
            except ValueError:
                raise ValueError(f"{env}={raw[:40]!r} is not a whole number of bytes") from None
        if value < 1:
            raise ValueError(f"{env.lower()} must be positive, got {value}")
        return value

    text = pick(max_text_bytes, "SHARE_MAX_TEXT_BYTES", MAX_TEXT_BYTES)
    return text, max(text, pick(max_line_bytes, "SHARE_MAX_LINE_BYTES", MAX_LINE_BYTES))


class _NoAliasLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses anchors and aliases before composing them: a task spec
    needs none, and expanding aliases lets a few hundred bytes become gigabytes."""

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            mark = event.start_mark
            raise yaml.YAMLError(
                f"anchors and aliases (&name, *name) are not allowed (line {mark.line + 1}, column {mark.column + 1})"
            )
        return super().compose_node(parent, index)


def load_yaml_text(text: str):
    """Parse untrusted YAML: safe types only, no anchors/aliases (raises yaml.YAMLError)."""
    return yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 - a SafeLoader subclass


@dataclass(frozen=True)
class TaskSpec:
    """What ``task.yaml`` declares. Build from untrusted input only via `from_yaml_dict`."""

    name: str
    type: str
    labels: tuple[str, ...] = ()
    text_field: str = "text"
    label_field: str = "label"
    metric: str = "accuracy"
    prompt_field: str = "prompt"
    completion_field: str = "completion"

    @property
    def is_classification(self) -> bool:
        """Whether the type has a label set (its rows carry a label)."""
        return self.type in LABELLED

    @property
    def row_fields(self) -> tuple[str, ...]:
        """The row keys this task reads: (text, label) or (prompt, completion)."""
        return tuple(getattr(self, f) for f in FIELDS[self.type])

    def to_yaml_dict(self) -> dict:
        out = {"name": self.name, "type": self.type}
        if self.is_classification:
            out["labels"] = list(self.labels)
        out.update({f: getattr(self, f) for f in FIELDS[self.type]})
        out["metric"] = self.metric
        return out

    @classmethod
    def from_yaml_dict(cls, d, source: str) -> TaskSpec:
        """Validate a parsed ``task.yaml``; `source` names the file in every error."""

        def fail(field: str, expected: str, got) -> TaskFormatError:
            return TaskFormatError(f"{source}: field '{field}' is {_brief(got)}; expected {expected}")

        if not isinstance(d, dict):
            raise TaskFormatError(f"{source}: expected a mapping of task fields, got {type(d).__name__}")
        every_field = tuple(dict.fromkeys(f for fields in FIELDS.values() for f in fields))
        known = ("name", "type", "labels", "metric", *every_field)
        unknown = sorted(str(k) for k in d if k not in known)
        if unknown:
            raise TaskFormatError(f"{source}: unknown field(s) {_brief(unknown)}; expected only {list(known)}")
        for key in ("name", "type"):
            if key not in d:
                raise TaskFormatError(f"{source}: missing required field '{key}'")

        name = d["name"]
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise fail("name", "1-64 characters of A-Z a-z 0-9 _ . - starting with a letter or digit", name)
        task_type = d["type"]
        if task_type not in METRICS:
            raise fail("type", f"one of {list(METRICS)}", task_type)

        labels = d.get("labels") or []
        if task_type in LABELLED:
            ok = (
                isinstance(labels, list)
                and all(isinstance(x, str) and x.strip() for x in labels)
                and len(set(labels)) == len(labels) >= 2
            )
            if not ok:
                raise fail("labels", "a list of >= 2 unique non-empty strings (quote numbers and yes/no)", labels)
        elif labels:
            raise fail("labels", f"empty or absent for type {task_type}", labels)

        fields = {}
        for other in every_field:
            if other in d and other not in FIELDS[task_type]:
                raise TaskFormatError(
                    f"{source}: field '{other}' does not apply to type {task_type} (it uses {list(FIELDS[task_type])})"
                )
        for key in FIELDS[task_type]:
            value = d.get(key, cls.__dataclass_fields__[key].default)
            if not isinstance(value, str) or not value.strip():
                raise fail(key, "a non-empty string", value)
            fields[key] = value
        if len(set(fields.values())) < len(fields):
            raise TaskFormatError(
                f"{source}: fields {list(fields)} must name different row keys, got {list(fields.values())}"
            )
        metric = d.get("metric", METRICS[task_type][0])
        if metric not in METRICS[task_type]:
            raise fail("metric", f"one of {list(METRICS[task_type])} for type {task_type}", metric)
        return cls(name=name, type=task_type, labels=tuple(labels), metric=metric, **fields)


def read_task_spec(path: Path) -> TaskSpec:
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_SPEC_BYTES + 1)
    except OSError as e:
        raise TaskFormatError(f"{path}: cannot read: {e.strerror or e}") from e
    if len(raw) > MAX_SPEC_BYTES:
        raise TaskFormatError(f"{path}: larger than {MAX_SPEC_BYTES} bytes (size limit)")
    try:
        data = load_yaml_text(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise TaskFormatError(f"{path}: not UTF-8 text: {e.reason} at byte {e.start}") from None
    except yaml.YAMLError as e:
        raise TaskFormatError(f"{path}: invalid YAML: {str(e)[:300]}") from None
    except RecursionError:
        raise TaskFormatError(f"{path}: invalid YAML: nested too deeply") from None
    return TaskSpec.from_yaml_dict(data, source=str(path))


def _check_row(row, spec: TaskSpec, where: str, max_text_bytes: int | None = None) -> None:
    """One example must carry what training reads: the text (at most `max_text_bytes` UTF-8
    bytes) and a known label (classification), or a prompt and a completion (causal LM)."""
    if not isinstance(row, dict):
        raise TaskFormatError(f"{where}: expected a JSON object, got {type(row).__name__}")
    limit = row_limits(max_text_bytes)[0]
    for key in spec.row_fields[:-1] if spec.is_classification else spec.row_fields:  # the label is checked below
        text = row.get(key)
        if not isinstance(text, str) or not text.strip():
            raise TaskFormatError(f"{where}: field '{key}' is {_brief(text)}; expected a non-empty string")
        size = len(text.encode("utf-8", "surrogatepass"))
        if size > limit:
            raise TaskFormatError(f"{where}: field '{key}' is {size} bytes; the limit is {limit} bytes per text value")
    if spec.is_classification:
        label = row.get(spec.label_field)
        if not isinstance(label, str) or label not in spec.labels:
            raise TaskFormatError(
                f"{where}: field '{spec.label_field}' is {_brief(label)}; expected one of {_brief(list(spec.labels))}"
            )


def read_examples(
    path: Path,
    spec: TaskSpec,
    max_rows: int = 1_000_000,
    max_text_bytes: int | None = None,
    max_line_bytes: int | None = None,
) -> list[dict]:
    """The examples of a JSONL file, every row checked. A line longer than the line limit is
    refused after reading at most limit + 1 of its bytes (it is never parsed); errors name the
    file and line ("train.jsonl:7: …")."""
    path = Path(path)
    text_limit, line_limit = row_limits(max_text_bytes, max_line_bytes)
    rows = []
    try:
        with open(path, "rb") as f:
            lineno = 0
            while True:
                raw = f.readline(line_limit + 1)
                if not raw:
                    break
                lineno += 1
                where = f"{path}:{lineno}"
                if len(raw) > line_limit and not (len(raw) == line_limit + 1 and raw.endswith(b"\n")):
                    raise TaskFormatError(
                        f"{where}: line is longer than {line_limit} bytes (the per-row limit; one example per line)"
                    )
                if not raw.strip():
                    continue
                if len(rows) >= max_rows:
                    raise TaskFormatError(f"{where}: more than {max_rows} rows (size limit)")
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise TaskFormatError(
                        f"{where}: not UTF-8 text ({e.reason} at byte {e.start} of the line)"
                    ) from None
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise TaskFormatError(f"{where}: invalid JSON: {e.msg} (column {e.colno})") from None
                except RecursionError:
                    raise TaskFormatError(f"{where}: invalid JSON: nested too deeply") from None
                _check_row(row, spec, where, text_limit)
                rows.append(row)
    except OSError as e:
        raise TaskFormatError(f"{path}: cannot read: {e.strerror or e}") from e
    if not rows:
        raise TaskFormatError(f"{path}: no examples")
    return rows


@dataclass
class TaskData:
    spec: TaskSpec
    train: list[dict]
    eval: list[dict]
    root: Path

    def majority_accuracy(self) -> float:
        """The score of always answering the most frequent eval label: every score's baseline."""
        if not self.spec.is_classification:
            raise ValueError(f"task {self.spec.name}: no majority baseline for type {self.spec.type}")
        counts = Counter(row[self.spec.label_field] for row in self.eval)
        return max(counts.values()) / len(self.eval)


def load_task(task_dir: Path, max_text_bytes: int | None = None, max_line_bytes: int | None = None) -> TaskData:
    task_dir = Path(task_dir)
    for name in TASK_FILES:
        if not (task_dir / name).is_file():
            raise TaskFormatError(f"{task_dir / name}: missing file (a task needs {list(TASK_FILES)})")
    spec = read_task_spec(task_dir / SPEC_FILE)
    limits = dict(max_text_bytes=max_text_bytes, max_line_bytes=max_line_bytes)
    train = read_examples(task_dir / TRAIN_FILE, spec, **limits)
    eval_rows = read_examples(task_dir / EVAL_FILE, spec, **limits)
    return TaskData(spec=spec, train=train, eval=eval_rows, root=task_dir)


def write_task(task_dir: Path, spec: TaskSpec, train_rows: list[dict], eval_rows: list[dict]) -> None:
    """Write a task that `load_task` accepts; ``task.yaml`` goes last since its arrival marks completion."""
    task_dir = Path(task_dir)
    spec = TaskSpec.from_yaml_dict(spec.to_yaml_dict(), source=str(task_dir / SPEC_FILE))
    for name, rows in ((TRAIN_FILE, train_rows), (EVAL_FILE, eval_rows)):
        for i, row in enumerate(rows, start=1):
            _check_row(row, spec, f"{task_dir / name}:{i}")
    task_dir.mkdir(parents=True, exist_ok=True)
    for name, rows in ((TRAIN_FILE, train_rows), (EVAL_FILE, eval_rows)):
        with open(task_dir / name, "w", encoding="utf-8", newline="\n") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    with open(task_dir / SPEC_FILE, "w", encoding="utf-8", newline="\n") as f:
        yaml.safe_dump(spec.to_yaml_dict(), f, sort_keys=False, allow_unicode=True)


def data_hash(task_dir: Path) -> str:
    """sha256 of the task's three files (sorted by name; each name and size hashed before its bytes)."""
    h = hashlib.sha256()
    for name in sorted(TASK_FILES):
        data = (Path(task_dir) / name).read_bytes()
        h.update(f"{name}\0{len(data)}\0".encode())
        h.update(data)
    return h.hexdigest()
