"""ShareModel: a transformers model whose target Linears share one low-rank subspace.

The SubspaceState is the source of truth; the ShareLinear layers hold a device copy of it.
Every change of the subspace (train a task, absorb adapters, finetune) computes a new state
first and only then installs it, so a failure leaves the model and the state unchanged.

Why one module of ~520 lines: ShareModel is one object (install a state, train, absorb, finetune,
export, merge into the base) whose methods share the install-after-compute invariant above; the
per-layer module is share_core.layer and the state and its storage are share_core.state.
"""

from __future__ import annotations

import contextlib
import copy
import json
from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call
from transformers.pytorch_utils import Conv1D

from . import subspace
from .base import base_model_hash, head_tensors, last_linear, pick_device  # noqa: F401 - pick_device: re-exported
from .layer import ShareLinear, in_out_features
from .peft_io import TASK_CARD, AdapterError, LoraAdapter, write_adapter
from .state import Delta, SubspaceState, TaskRecord, check_task_name


def is_target(module_name: str, targets: list[str]) -> bool:
    """PEFT's rule for a list of names: the module's name is one of them or ends with '.name'."""
    return any(module_name == t or module_name.endswith("." + t) for t in targets)


class ShareModel(nn.Module):
    def __init__(self, model: nn.Module, state: SubspaceState, check_hash: bool = True) -> None:
        super().__init__()
        if check_hash:
            actual = base_model_hash(model, state.head_modules)
            if actual != state.base_model_hash:
                raise ValueError(
                    f"base model hash {actual[:12]}… differs from the subspace's "
                    f"{state.base_model_hash[:12]}… (built on {state.base_model_id!r}): wrong base model"
                )
        self.model = model
        self.state = state
        self.layers: dict[str, ShareLinear] = {}
        for name in state.bases:
            self.layers[name] = self._wrap(name)
        for p in model.parameters():
            p.requires_grad_(False)
        self._heads_backup = head_tensors(model, state.head_modules)
        self.active_task: str | None = None
        self.training_task: str | None = None
        self.last_errors: dict[str, float] = {}  # per task: worst relative ΔW error of the last build/merge
        self._sync()

    # ---- construction ----------------------------------------------------------------------
    def _wrap(self, name: str) -> ShareLinear:
        try:
            module = self.model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"layer {name!r} of the subspace does not exist in this model") from None
        if isinstance(module, ShareLinear):
            return module
        d, n = in_out_features(module)
        b, a = self.state.bases[name]
        if (b.shape[0], a.shape[0]) != (n, d):
            raise ValueError(f"layer {name}: model has n×d = {n}×{d}, subspace has {b.shape[0]}×{a.shape[0]}")
        wrapped = ShareLinear(module)
        parent_name, _, child = name.rpartition(".")
        setattr(self.model.get_submodule(parent_name) if parent_name else self.model, child, wrapped)
        return wrapped

    @classmethod
    def from_adapters(
        cls,
        model: nn.Module,
        adapters: list[LoraAdapter],
        *,
        base_model_id: str,
        policy: subspace.KPolicy,
        phi: int = 2,
        infos: list[dict] | None = None,
    ) -> ShareModel:
        """Initialise the subspace from m ≥ 1 LoRA adapters (DESIGN §2, Initialization)."""
        if not adapters:
            raise ValueError("need at least one adapter to initialise a subspace")
        first = adapters[0]
        targets, heads = first.target_modules, first.modules_to_save
        names = [a.name for a in adapters]
        if len(set(names)) != len(names):
            raise AdapterError(f"duplicate adapter names {names}")
        for a in adapters:
            check_task_name(a.name)
            check_adapter_fits(a, base_model_id, targets, heads, layer_shapes(model, a.factors))
        layers = sorted(first.factors)
        bases, per_task, worst = {}, [dict() for _ in adapters], {a.name: 0.0 for a in adapters}
        for layer in layers:
            f = subspace.build(
                [a.factors[layer][0] for a in adapters], [a.factors[layer][1].T for a in adapters], policy
            )
            bases[layer] = (f.basis_b, f.basis_a)
            for j, a in enumerate(adapters):
                per_task[j][layer] = (f.coefs_b[j], f.coefs_a[j])
                worst[a.name] = max(worst[a.name], f.errors[j])
        infos = infos or [{} for _ in adapters]
        tasks = [
            TaskRecord(a.name, a.rank, a.scale, per_task[j], dict(a.heads), {"source": "adapter", **infos[j]})
            for j, a in enumerate(adapters)
        ]
        state = SubspaceState(
            base_model_id=base_model_id,
            base_model_hash=base_model_hash(model, heads),
            target_modules=list(targets),
            head_modules=list(heads),
            bases=bases,
            tasks=tasks,
            policy=policy,
            phi=phi,
        )
        share = cls(model, state, check_hash=False)
        share.last_errors = worst
        return share

    # ---- syncing state -> layers -------------------------------------------------------------
    def _sync(self) -> None:
        for name, layer in self.layers.items():
            b, a = self.state.bases[name]
            layer.set_subspace(b, a, [t.coefs[name] for t in self.state.tasks], [t.scale for t in self.state.tasks])
        if self.active_task is not None:
            self.activate(self.active_task)

    def _index(self, task: str) -> int:
        self.state.task(task)
        return self.state.task_names.index(task)

    # ---- heads -------------------------------------------------------------------------------
    def _install_head(self, tensors: dict[str, torch.Tensor], trainable: bool = False) -> None:
        dev = next(self.model.parameters()).device
        for key, t in tensors.items():
            mod_name, _, pname = key.rpartition(".")
            mod = self.model.get_submodule(mod_name)
            setattr(mod, pname, nn.Parameter(t.to(dev).clone(), requires_grad=trainable))
            if isinstance(mod, nn.Linear) and pname == "weight":
                mod.out_features, mod.in_features = t.shape

    def new_head(self, num_labels: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Fresh head tensors for a task: pretrained head copied, its last Linear re-initialised
        with `num_labels` outputs (std 0.02, zero bias, like transformers' init)."""
        tensors = dict(self._heads_backup)
        last = last_linear(self.model, self.state.head_modules)
        d = tensors[f"{last}.weight"].shape[1]
        tensors[f"{last}.weight"] = torch.randn(num_labels, d, generator=generator) * 0.02
        if f"{last}.bias" in tensors:
            tensors[f"{last}.bias"] = torch.zeros(num_labels)
        return tensors

    # ---- inference ---------------------------------------------------------------------------
    def activate(self, task: str | None) -> None:
        """Apply `task`'s update and head in forward (None: the bare base model)."""
        index = None if task is None else self._index(task)
        for layer in self.layers.values():
            layer.active, layer.task_ids = index, None
        self._install_head(self.state.task(task).heads if task else self._heads_backup)
        self.active_task = task

    def forward(self, **inputs):
        return self.model(**inputs)

    @contextlib.contextmanager
    def mixed(self, tasks: list[str]):
        """Within the block, example i of every batch uses tasks[i]'s update (the batch's rows
        keep their order: a forward, or a greedy generation with its KV cache). Heads are not
        switched: see forward_mixed."""
        ids = torch.tensor([self._index(t) for t in tasks], device=next(self.model.parameters()).device)
        for layer in self.layers.values():
            layer.task_ids = ids
        try:
            yield
        finally:
            for layer in self.layers.values():
                layer.task_ids = None

    @torch.no_grad()
    def forward_mixed(self, tasks: list[str], **inputs) -> list[torch.Tensor]:
        """One forward for a batch whose example i belongs to tasks[i]; per-example logits.

        αᵀx and β(·) are shared across the batch; heads are applied per task to the head's
        captured input with functional_call (no module is swapped mid-batch).
        """
        if len(self.state.head_modules) > 1:  # a head of several modules: one forward per task of the batch
            return self._forward_per_task(tasks, inputs)
        device = next(self.model.parameters()).device
        captured = {}
        hooks = []
        if self.state.head_modules:
            head = self.model.get_submodule(self.state.head_modules[0])
            hooks.append(
                head.register_forward_pre_hook(
                    lambda m, args, kw: captured.update(args=args, kwargs=kw), with_kwargs=True
                )
            )
        try:
            with self.mixed(tasks):
                out = self.model(**inputs)
        finally:
            for h in hooks:
                h.remove()
        if not self.state.head_modules:
            return list(out.logits)
        head_name = self.state.head_modules[0]
        result: list[torch.Tensor | None] = [None] * len(tasks)
        for t in dict.fromkeys(tasks):
            rows = [i for i, x in enumerate(tasks) if x == t]
            params = {
                k[len(head_name) + 1 :]: v.to(device)
                for k, v in self.state.task(t).heads.items()
                if k.startswith(head_name + ".")
            }
            args = tuple(a[rows] for a in captured["args"])
            logits = functional_call(head, params, args, captured["kwargs"])
            if logits.dim() == 3:  # a decoder's score head runs on every position: pool as the model does
                logits = self._last_token(logits, inputs["input_ids"][rows])
            for j, i in enumerate(rows):
                result[i] = logits[j]
        return result

    def _last_token(self, logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """(rows, seq, labels) → (rows, labels): each row's logits at its last non-pad token, the
        pooling of transformers' decoder sequence classifiers (LlamaForSequenceClassification)."""
        pad = getattr(self.model.config, "pad_token_id", None)
        positions = torch.arange(input_ids.shape[-1], device=logits.device)
        if pad is None:
            last = torch.full((input_ids.shape[0],), input_ids.shape[-1] - 1, device=logits.device)
        else:
            last = (positions * (input_ids.to(logits.device) != pad)).argmax(-1)
        return logits[torch.arange(logits.shape[0], device=logits.device), last]

    def _forward_per_task(self, tasks: list[str], inputs: dict) -> list[torch.Tensor]:
        active, result = self.active_task, [None] * len(tasks)
        try:
            for t in dict.fromkeys(tasks):
                rows = [i for i, x in enumerate(tasks) if x == t]
                self.activate(t)
                logits = self.model(**{k: v[rows] for k, v in inputs.items()}).logits
                for j, i in enumerate(rows):
                    result[i] = logits[j]
        finally:
            self.activate(active)
        return result

    def merge_into_base(self, task: str) -> None:
        """Add ΔW(task) to W0 of every layer and install its head: zero-overhead inference."""
        index = self._index(task)
        self.activate(task)
        for layer in self.layers.values():
            layer.merge_task(index)

    def unmerge(self) -> None:
        for layer in self.layers.values():
            layer.unmerge_task()

    # ---- export -------------------------------------------------------------------------------
    def task_adapter(self, task: str) -> LoraAdapter:
        """Task t as a plain LoRA: B = βE_B (n×p), A = (αE_A)ᵀ (p×d), lora_alpha = s·p."""
        t = self.state.task(task)
        factors = {ln: (b @ t.coefs[ln][0], (a @ t.coefs[ln][1]).T) for ln, (b, a) in self.state.bases.items()}
        return LoraAdapter(
            name=task,
            rank=t.rank,
            lora_alpha=t.scale * t.rank,
            scale=t.scale,
            target_modules=list(self.state.target_modules),
            factors=factors,
            heads=dict(t.heads),
            modules_to_save=list(self.state.head_modules),
            base_model_name=self.state.base_model_id,
        )

    def export_task(self, task: str, path, task_type: str | None = None, base=None) -> Path:
        """Write task t as a standard PEFT LoRA directory that PeftModel.from_pretrained loads
        (task_type: PEFT's, e.g. CAUSAL_LM, from the base's family), with `share_task.json`:
        what building the base model needs (num_labels, id2label, label2id) and where it came from."""
        conv = any(isinstance(layer.base, Conv1D) for layer in self.layers.values())
        adapter = self.task_adapter(task)
        adapter.task_type = task_type
        labels = list(self.state.task(task).info.get("labels", []))
        card = {
            "task": task,
            "base_model": self.state.base_model_id,
            "base_model_hash": self.state.base_model_hash,
            "peft_task_type": task_type,
        }
        if base is not None:  # a share_core.base.BaseSpec: where the base loads from offline, and how to get it
            card.update(base.export_card())
        if labels:  # the head's size comes from the adapter (modules_to_save), whatever the checkpoint's head was
            # JSON has only string keys and from_pretrained keeps them: the labels travel as a list, in
            # output order (config.id2label = dict(enumerate(card["labels"])) gives transformers' int keys)
            card["labels"] = labels
            card["from_pretrained_kwargs"] = {"num_labels": len(labels), "ignore_mismatched_sizes": True}
        return write_adapter(path, adapter, fan_in_fan_out=conv, extra={TASK_CARD: json.dumps(card, indent=1)})

    # ---- continual adaptation ----------------------------------------------------------------
    def begin_task(
        self, name: str, *, rank: int, scale: float, num_labels: int | None, seed: int = 0, info: dict | None = None
    ) -> list[nn.Parameter]:
        """Open trainable coefficients (+φ temporary directions) and a fresh head for a new task.

        Returns exactly the parameters to optimise; the basis stays frozen.
        """
        check_task_name(name)
        if name in self.state.task_names:
            raise ValueError(f"task {name!r} already exists in this subspace")
        if self.training_task is not None:
            raise RuntimeError(f"task {self.training_task!r} is still being trained")
        g = torch.Generator().manual_seed(seed)
        self.activate(None)
        for layer in self.layers.values():
            layer.open_slot(rank, self.state.phi, scale, g)
        if self.state.head_modules:  # a fresh head of num_labels outputs, or (None) the pretrained head to train
            self._install_head(
                self.new_head(num_labels, g) if num_labels is not None else dict(self._heads_backup), trainable=True
            )
        self.training_task = name
        self._pending = {"rank": rank, "scale": scale, "info": dict(info or {}), "finetune": False}
        return self.trainable_parameters()

    def begin_finetune(self, name: str) -> list[nn.Parameter]:
        """Share-full: make an existing task's coefficients and head trainable (basis frozen)."""
        task = self.state.task(name)
        self.activate(None)
        for layer_name, layer in self.layers.items():
            layer.open_slot(task.rank, 0, task.scale, torch.Generator(), init=task.coefs[layer_name])
        self._install_head(task.heads, trainable=True)
        self.training_task = name
        self._pending = {"rank": task.rank, "scale": task.scale, "info": dict(task.info), "finetune": True}
        return self.trainable_parameters()

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def finish_task(self, policy: subspace.KPolicy | None = None) -> dict[str, float]:
        """Merge the trained task into the subspace; return each task's worst relative ΔW error.

        A finetuned task keeps the basis: its coefficients are written back as trained.
        """
        if self.training_task is None:
            raise RuntimeError("no task is being trained")
        name, pend = self.training_task, self._pending
        heads = head_tensors(self.model, self.state.head_modules)
        if pend["finetune"]:
            coefs = {
                ln: (layer.slot["coef_b"].detach().cpu().clone(), layer.slot["coef_a"].detach().cpu().clone())
                for ln, layer in self.layers.items()
            }
            new_state = copy.copy(self.state)
            new_state.delta, new_state.content_hash = (
                None,
                None,
            )  # a finetuned task is rewritten: the next save is a snapshot
            new_state.tasks = [
                TaskRecord(t.name, t.rank, t.scale, coefs, heads, {**t.info, "finetuned": True})
                if t.name == name
                else t
                for t in self.state.tasks
            ]
            errors = {
                t.name: 0.0 for t in self.state.tasks if t.name != name
            }  # no entry for `name`: evaluation re-scores it
        else:
            factors = {}
            for ln, layer in self.layers.items():
                with torch.no_grad():
                    b_hat, a_hat = layer.slot_factors()
                    dirs_b = layer.slot["dirs_b"] if "dirs_b" in layer.slot else b_hat[:, :0]
                    dirs_a = layer.slot["dirs_a"] if "dirs_a" in layer.slot else a_hat[:, :0]
                factors[ln] = (b_hat.cpu(), a_hat.cpu(), dirs_b.detach().cpu(), dirs_a.detach().cpu())
            record = TaskRecord(name, pend["rank"], pend["scale"], {}, heads, {"source": "dataset", **pend["info"]})
            new_state, errors = _merged_state(self.state, [record], factors, policy or self.state.policy)
        self._install(new_state)
        self.last_errors = errors
        return errors

    def absorb(
        self, adapters: list[LoraAdapter], infos: list[dict] | None = None, policy: subspace.KPolicy | None = None
    ) -> dict[str, float]:
        """Fold LoRA adapters (no data) into the subspace in one merge; old data never touched."""
        names = [a.name for a in adapters]
        clash = set(names) & set(self.state.task_names)
        if clash or len(set(names)) != len(names):
            raise AdapterError(f"adapter names {sorted(clash) or names} already exist or repeat")
        for a in adapters:
            check_task_name(a.name)
            check_adapter_fits(
                a,
                self.state.base_model_id,
                self.state.target_modules,
                self.state.head_modules,
                layer_shapes(self.model, self.state.bases),
                exact_layers=True,
            )
        infos = infos or [{} for _ in adapters]
        factors = {
            ln: (
                [a.factors[ln][0] for a in adapters],
                [a.factors[ln][1].T for a in adapters],
                torch.cat([a.factors[ln][0] for a in adapters], 1),
                torch.cat([a.factors[ln][1].T for a in adapters], 1),
            )
            for ln in self.state.bases
        }
        records = [
            TaskRecord(a.name, a.rank, a.scale, {}, dict(a.heads), {"source": "adapter", **i})
            for a, i in zip(adapters, infos)
        ]
        new_state, errors = _merged_state(self.state, records, factors, policy or self.state.policy)
        self._install(new_state)
        self.last_errors = errors
        return errors

    def _install(self, new_state: SubspaceState) -> None:
        for layer in self.layers.values():
            layer.close_slot()
        self.training_task = None
        self.state = new_state
        self.active_task = None
        self._sync()
        self.activate(None)


def check_adapter_fits(
    a: LoraAdapter,
    base_model_id: str,
    targets: list[str],
    heads: list[str],
    shapes: dict[str, tuple[int, int]] | None = None,
    exact_layers: bool = False,
) -> None:
    """An adapter must be for this base model, these target modules and heads, and the layer
    shapes (n, d) in `shapes` (None: not known yet); with `exact_layers` it must adapt exactly
    those layers. Used
    against a live model and, by the landing validator, against a version's manifest."""
    src = f"adapter {a.name!r}"
    if a.base_model_name and base_model_id and not same_base_model(a.base_model_name, base_model_id):
        raise AdapterError(f"{src} was trained on base model {a.base_model_name!r}, not {base_model_id!r}")
    if sorted(a.target_modules) != sorted(targets):
        raise AdapterError(f"{src} targets {sorted(a.target_modules)}, the subspace targets {sorted(targets)}")
    if sorted(a.modules_to_save) != sorted(heads):
        raise AdapterError(f"{src} saves heads {sorted(a.modules_to_save)}, the subspace expects {sorted(heads)}")
    if shapes is None:
        return
    if exact_layers and set(a.factors) != set(shapes):
        raise AdapterError(f"{src} adapts layers {sorted(set(a.factors) ^ set(shapes))} differently from the subspace")
    for layer, (b, A) in a.factors.items():
        if layer not in shapes:
            raise AdapterError(f"{src}: layer {layer!r} does not exist in the base model")
        n, d = shapes[layer]
        if b.shape[0] != n or A.shape[1] != d:
            raise AdapterError(
                f"{src}: layer {layer}: factors imply {b.shape[0]}×{A.shape[1]}, the base layer is {n}×{d}"
            )


def layer_shapes(model: nn.Module, layers) -> dict[str, tuple[int, int]]:
    """(n, d) of each named layer that exists in `model` (wrapped or not)."""
    out = {}
    for layer in layers:
        try:
            module = model.get_submodule(layer)
        except AttributeError:
            continue
        d, n = in_out_features(module.base if isinstance(module, ShareLinear) else module)
        out[layer] = (n, d)
    return out


def same_base_model(a: str, b: str) -> bool:
    """Model ids match exactly or by their last path component (local paths differ by machine)."""
    norm = lambda s: s.rstrip("/").split("/")[-1].lower()  # noqa: E731
    return a == b or norm(a) == norm(b)


def _merged_state(
    state: SubspaceState, records: list[TaskRecord], factors: dict, policy: subspace.KPolicy
) -> tuple[SubspaceState, dict[str, float]]:
    """A new SubspaceState with `records` merged in. factors[layer] = (new B̂ list or tensor,
    new Â list or tensor, new directions B side n×c, A side d×c)."""
    new_bases, new_coefs, worst, frames = {}, [dict() for _ in state.tasks + records], {}, {}
    layers = list(state.bases)
    items = []
    for ln in layers:
        fb, fa, db, da = factors[ln]
        old_b, old_a = [t.coefs[ln][0] for t in state.tasks], [t.coefs[ln][1] for t in state.tasks]
        items.append(
            (
                *state.bases[ln],
                old_b,
                old_a,
                db,
                da,
                fb if isinstance(fb, list) else [fb],
                fa if isinstance(fa, list) else [fa],
            )
        )
    for ln, f in zip(layers, subspace.merge_layers(items, policy)):  # layers of equal shapes are merged as one batch
        new_bases[ln] = (f.basis_b, f.basis_a)
        frames[ln] = (f.frame_b, f.frame_a)
        for j, (eb, ea) in enumerate(zip(f.coefs_b, f.coefs_a)):
            new_coefs[j][ln] = (eb, ea)
        for t, err in zip(state.tasks + records, f.errors):
            worst[t.name] = max(worst.get(t.name, 0.0), err)
    tasks = [
        TaskRecord(t.name, t.rank, t.scale, new_coefs[j], t.heads, t.info) for j, t in enumerate(state.tasks + records)
    ]
    new_state = copy.copy(state)
    new_state.bases, new_state.tasks, new_state.policy = new_bases, tasks, policy
    new_state.delta = Delta(frames=frames, base_hash=state.content_hash, n_old=len(state.tasks))
    new_state.content_hash = None  # not saved yet
    return new_state, worst
