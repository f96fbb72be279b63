"""Task families: how a base model is used for one kind of task (DESIGN §8).

A family says how to load the base (the transformers class), which modules are adapted and
which heads each task trains (defaults per architecture), how rows become a training batch,
the loss, and how a task is scored. Training (`share_core.train`) and the pipeline's
evaluation call a family and never branch on the task type themselves. A family is named by
the task type it serves (`task.yaml` `type:` and params.yaml `base.family` use the same names).

Scoring takes rows of *different tasks* in one batch when the model is a ShareModel (the
subspace's mixed-task path: one forward or one greedy generation serves every task in the
batch), or rows of one task on any other model (a PEFT or plain transformers model). Every
score comes with a margin: the smallest gap between the top two logits behind any prediction
(for generation: over every generated token), which is what lets the evaluation certify that a
tiny change of ΔW cannot change a prediction.

Adding a family (image classification: the processor instead of the tokenizer, pixel batches,
the same accuracy scoring) is one more subclass registered in FAMILIES.

Why one module of ~520 lines: the Family contract and its two implementations (sequence
classification, causal LM with its prompt/chat helpers) change together whenever the contract does;
a third family would be its own module registering itself the same way.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from .base import _FAMILIES, register_family, set_head_outputs
from .base import family as family  # noqa: PLC0414 - the registry lives in the leaf module base
from .model import ShareModel
from .taskdata import CAUSAL_LM, CLASSIFICATION, TaskData, TaskSpec, register_task_type

LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3")
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
Item = tuple[str, TaskSpec, dict]  # (task name, its spec, one eval row)


class Family:
    """The interface (and what the two text families share)."""

    name: str
    auto_class = None
    peft_task_type: str | None = None  # adapter_config.json task_type written on export and accepted on landing
    targets: dict[str, list[str]] = {}
    heads: dict[str, list[str]] = {}
    # serving (the MLflow pyfunc schema): the row's input column beside `task`, and the output
    # columns as (name, type) with type "string" or "double[]"
    input_column: str = "text"
    output_columns: tuple[tuple[str, str], ...] = ()
    demo_steps: int = 60  # training steps per task in `share demo`
    # the task format (share_core.taskdata): the TaskSpec fields naming a row's keys, the metrics
    # (the first is the default) and whether tasks have a label set (the last field is the label)
    spec_fields: tuple[str, ...] = ()
    metrics: tuple[str, ...] = ()
    labelled: bool = False

    def load(self, path: str):
        model = self.auto_class.from_pretrained(path, **self.load_kwargs())
        tok = AutoTokenizer.from_pretrained(path)
        return model.eval(), tok

    def load_kwargs(self) -> dict:
        return {}

    def _default(self, table: dict[str, list[str]], model_type: str, key: str) -> list[str]:
        if model_type not in table:
            raise ValueError(
                f"no default {key} for model type {model_type!r} in family {self.name!r} "
                f"(known: {sorted(table)}); set base.{key} in params.yaml"
            )
        return list(table[model_type])

    def default_targets(self, model_type: str) -> list[str]:
        return self._default(self.targets, model_type, "target_modules")

    def default_heads(self, model_type: str) -> list[str]:
        return self._default(self.heads, model_type, "head_modules")

    # ---- per task -------------------------------------------------------------------------
    def num_labels(self, spec: TaskSpec) -> int | None:
        """Outputs of a new task's head (None: the pretrained head is copied as it is)."""
        return None

    def prepare(self, model: nn.Module, spec: TaskSpec, heads: list[str], seed: int) -> None:
        """Shape `model`'s heads for `spec` before a plain LoRA trains on it."""

    def check_train(self, data: TaskData) -> None:
        """Raise ValueError when the training rows cannot teach this task."""

    def baseline(self, data: TaskData) -> float | None:
        """The score a trivial predictor gets (shown next to every score); None: not defined."""
        return None

    def zero_shot(self, model: nn.Module, tok, data: TaskData, **scoring) -> float | None:
        """The base model's own score on the task, untrained (the baseline of a family without
        a trivial predictor); None where `baseline` is defined. `model`: the base, or a
        ShareModel (scored with no task active)."""
        if self.baseline(data) is not None or not data.eval:
            return None
        if isinstance(model, ShareModel):
            model.activate(None)
        items = [(data.spec.name, data.spec, row) for row in data.eval]
        return self.score(model, tok, items, mixed=False, **scoring)[data.spec.name]["score"]

    def encode(
        self, tok, spec: TaskSpec, rows: list[dict], max_length: int, device: torch.device
    ) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def serve_rows(self, tasks: list[str], outputs: list, labels: dict[str, list[str]]) -> dict[str, list]:
        """The output columns of `predict`'s results (row i of task tasks[i]); `labels`: each
        task's label names."""
        raise NotImplementedError

    def predict(
        self,
        model: ShareModel,
        tok,
        tasks: list[str],
        inputs: list[str],
        *,
        max_length: int,
        batch_size: int = 64,
        max_new_tokens: int = 16,
    ) -> list:
        """What serving returns for row i (input text of task tasks[i]), in mixed-task batches:
        class probabilities (classification) or the greedy completion (causal LM)."""
        raise NotImplementedError

    def score(
        self,
        model: nn.Module,
        tok,
        items: list[Item],
        *,
        max_length: int,
        batch_size: int = 64,
        max_new_tokens: int = 16,
        mixed: bool = True,
    ) -> dict[str, dict]:
        """{task: {"score", "margin"}} over `items`: rows of different tasks in one batch on a
        ShareModel (mixed), else every row through the model as it is (one activated task)."""
        raise NotImplementedError


class _Tally:
    """Running mean of a task's per-row metric and the smallest margin seen; every row's metric
    and margin in the order scored ("values", "margins": what per-row certificates start from)."""

    def __init__(self) -> None:
        self.total, self.n, self.margin = 0.0, 0, math.inf
        self.values: list[float] = []
        self.margins: list[float] = []

    def add(self, value: float, margin: float) -> None:
        self.total += value
        self.n += 1
        self.margin = min(self.margin, margin)
        self.values.append(value)
        self.margins.append(margin)

    def result(self) -> dict:
        return {
            "score": self.total / max(self.n, 1),
            "margin": None if self.margin == math.inf else self.margin,
            "values": self.values,
            "margins": self.margins,
        }


def _top2_gap(logits: torch.Tensor) -> torch.Tensor:
    """Gap between the two largest logits along the last axis (inf with a single output)."""
    if logits.shape[-1] < 2:
        return torch.full(logits.shape[:-1], math.inf)
    top = logits.float().topk(2, dim=-1).values
    return top[..., 0] - top[..., 1]


def _chunks(items: list[Item], size: int) -> Iterable[list[Item]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class SequenceClassification(Family):
    name = CLASSIFICATION
    auto_class = AutoModelForSequenceClassification
    targets = {
        "bert": ["query", "value"],
        "roberta": ["query", "value"],
        "distilbert": ["q_lin", "v_lin"],
        "gpt2": ["c_attn"],
        **{t: LLAMA_TARGETS for t in LLAMA_LIKE},
    }
    heads = {
        "bert": ["classifier"],
        "roberta": ["classifier"],
        "distilbert": ["pre_classifier", "classifier"],
        "gpt2": ["score"],
        **{t: ["score"] for t in LLAMA_LIKE},
    }

    input_column = "text"
    output_columns = (("label", "string"), ("probabilities", "double[]"))
    spec_fields = ("text_field", "label_field")
    metrics = ("accuracy",)
    labelled = True

    def load_kwargs(self) -> dict:
        return {"num_labels": 2}  # every task installs a head of its own label count

    def serve_rows(self, tasks, outputs, labels):
        best = [labels[t][max(range(len(p)), key=p.__getitem__)] for t, p in zip(tasks, outputs)]
        return {"label": best, "probabilities": outputs}

    def load(self, path):
        model, tok = super().load(path)
        if tok.pad_token_id is None:  # decoder tokenizers (GPT-2, Llama) have none: pad with EOS, and tell the model
            tok.pad_token = tok.eos_token
        if getattr(model.config, "pad_token_id", None) is None:
            model.config.pad_token_id = tok.pad_token_id
        return model, tok

    def num_labels(self, spec: TaskSpec) -> int | None:
        return len(spec.labels)

    def prepare(self, model: nn.Module, spec: TaskSpec, heads: list[str], seed: int) -> None:
        set_head_outputs(model, heads, len(spec.labels), seed)

    def check_train(self, data: TaskData) -> None:
        seen = {row[data.spec.label_field] for row in data.train}
        if len(seen) < 2:
            raise ValueError(f"only label(s) {sorted(seen)} occur; a classifier needs at least two")

    def baseline(self, data: TaskData) -> float | None:
        return data.majority_accuracy()

    def encode(self, tok, spec, rows, max_length, device):
        enc = tok(
            [r[spec.text_field] for r in rows],
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        batch = {
            "input_ids": enc["input_ids"],
            "attention_mask": enc["attention_mask"],
            "labels": torch.tensor([spec.labels.index(r[spec.label_field]) for r in rows]),
        }
        return {k: v.to(device) for k, v in batch.items()}

    def loss(self, model, batch):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return nn.functional.cross_entropy(logits, batch["labels"])

    @torch.no_grad()
    def predict(self, model, tok, tasks, inputs, *, max_length, batch_size=64, max_new_tokens=16):
        device = next(model.parameters()).device
        out = []
        for start in range(0, len(inputs), batch_size):
            enc = tok(
                inputs[start : start + batch_size],
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            )
            logits = model.forward_mixed(
                tasks[start : start + batch_size], **{k: enc[k].to(device) for k in ("input_ids", "attention_mask")}
            )
            out += [row.float().softmax(-1).tolist() for row in logits]
        return out

    @torch.no_grad()
    def score(self, model, tok, items, *, max_length, batch_size=64, max_new_tokens=16, mixed=True):
        device = next(model.parameters()).device
        tallies: dict[str, _Tally] = {}
        for chunk in _chunks(items, batch_size):
            enc = tok(
                [row[spec.text_field] for _, spec, row in chunk],
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            )
            inputs = {k: enc[k].to(device) for k in ("input_ids", "attention_mask")}
            if mixed and isinstance(model, ShareModel):  # per row: tasks differ in their label counts
                logits = model.forward_mixed([t for t, _, _ in chunk], **inputs)
            else:
                logits = list(model(**inputs).logits)
            for row_logits, (t, spec, row) in zip(logits, chunk):
                hit = int(row_logits.argmax()) == spec.labels.index(row[spec.label_field])
                tallies.setdefault(t, _Tally()).add(float(hit), float(_top2_gap(row_logits)))
        return {t: tally.result() for t, tally in tallies.items()}


@functools.lru_cache(maxsize=1)
def _rouge():
    from rouge_score import rouge_scorer  # noqa: PLC0415 - loads nltk (~1.5 s); share_core/__init__ imports this module, only causal-LM scoring needs it

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def normalize_answer(text: str) -> str:
    return " ".join(text.lower().split())


def completion_metric(metric: str, prediction: str, reference: str) -> float:
    """exact_match: equal after lower-casing and collapsing whitespace; rouge_l: ROUGE-L F1
    (rouge-score, as the paper's Lots-of-LoRAs evaluation)."""
    if metric == "exact_match":
        return float(normalize_answer(prediction) == normalize_answer(reference))
    if metric == "rouge_l":
        return _rouge().score(reference, prediction)["rougeL"].fmeasure
    raise ValueError(f"unknown causal-LM metric {metric!r}")


TURN_END_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>")  # ChatML, Llama 3, Gemma, Phi-3


def uses_chat(tok) -> bool:
    """Whether prompts go through the tokenizer's chat template (`base.chat_template: none`
    removes the template from the loaded tokenizer)."""
    return bool(getattr(tok, "chat_template", None))


def render_prompt(tok, prompt: str) -> str:
    """The text the model reads for `prompt`: one user turn and the assistant's header through
    the chat template (with the template's default system turn), or the prompt as it is."""
    if not uses_chat(tok):
        return prompt
    return tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)


def prompt_token_ids(tok, prompt: str) -> list[int]:
    if uses_chat(tok):  # the template writes the special tokens itself
        return tok(render_prompt(tok, prompt), add_special_tokens=False)["input_ids"]
    return tok(prompt)["input_ids"]


def turn_end_id(tok) -> int | None:
    """The token a completion ends with: the chat template's end of turn when there is one in
    the vocabulary, else EOS."""
    if uses_chat(tok):
        vocab = tok.get_vocab()
        for name in TURN_END_TOKENS:
            if name in vocab:
                return vocab[name]
    return tok.eos_token_id


def stop_ids(tok, model=None) -> list[int]:
    """Every token id that ends a greedy completion: the turn end, EOS, and the model's
    generation config's EOS ids."""
    ids = [turn_end_id(tok), tok.eos_token_id]
    inner = getattr(model, "model", model) if isinstance(model, ShareModel) else model
    eos = getattr(getattr(inner, "generation_config", None), "eos_token_id", None)
    ids += eos if isinstance(eos, list) else [eos]
    return [i for i in dict.fromkeys(ids) if i is not None]


class CausalLM(Family):
    """Instruction tasks: a prompt and its completion. Loss on the completion tokens only (the
    completion ends with EOS so the model learns to stop); scored by greedy generation."""

    name = CAUSAL_LM
    auto_class = AutoModelForCausalLM
    peft_task_type = "CAUSAL_LM"
    targets = {"gpt2": ["c_attn", "c_proj", "c_fc"], **{t: LLAMA_TARGETS for t in LLAMA_LIKE}}
    heads = {t: [] for t in ("gpt2", *LLAMA_LIKE)}
    input_column = "prompt"
    output_columns = (("completion", "string"),)
    spec_fields = ("prompt_field", "completion_field")
    metrics = ("exact_match", "rouge_l")
    demo_steps = 150  # the tiny random Llama starts from nothing

    def serve_rows(self, tasks, outputs, labels):
        return {"completion": outputs}

    def load(self, path):
        model, tok = super().load(path)
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        model.generation_config.pad_token_id = tok.pad_token_id
        return model, tok

    def prompt_ids(self, tok, spec: TaskSpec, row: dict, max_length: int, room: int = 0) -> list[int]:
        """The prompt's token ids as the model reads it: through the tokenizer's chat template
        (a user turn and the assistant's header) when the tokenizer has one, else the text with
        the tokenizer's special tokens; keeping its last max_length − room tokens (the end of a
        prompt is what the completion follows)."""
        ids = prompt_token_ids(tok, row[spec.prompt_field])
        keep = max(1, max_length - room)
        return ids[-keep:]

    def completion_ids(self, tok, spec: TaskSpec, row: dict, max_length: int) -> list[int]:
        """The completion's ids and the token that ends it (the end of the assistant's turn for
        a chat model, EOS otherwise): what the model learns to generate, and to stop."""
        text = row[spec.completion_field].strip()
        ids = tok(text if uses_chat(tok) else " " + text, add_special_tokens=False)["input_ids"]
        ids = ids[: max(1, max_length - 2)]
        end = turn_end_id(tok)
        return ids + ([end] if end is not None else [])

    def encode(self, tok, spec, rows, max_length, device):
        seqs, masks = [], []
        for r in rows:
            c = self.completion_ids(tok, spec, r, max_length)
            # the prompt as generation reads it (its last max_length tokens, whatever the completion's
            # length): a context cut differently in training than in scoring is not the task learned
            p = self.prompt_ids(tok, spec, r, max_length)
            seqs.append(p + c)
            masks.append(len(p))
        width = max(map(len, seqs))
        pad = tok.pad_token_id
        input_ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs])
        attention = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
        labels = input_ids.clone()
        for i, n in enumerate(masks):
            labels[i, :n] = -100
        labels[attention == 0] = -100
        return {"input_ids": input_ids.to(device), "attention_mask": attention.to(device), "labels": labels.to(device)}

    def loss(self, model, batch):
        return model(**batch).loss

    @torch.no_grad()
    def predict(self, model, tok, tasks, inputs, *, max_length, batch_size=64, max_new_tokens=16):
        items = [(t, TaskSpec(name=t, type=CAUSAL_LM), {"prompt": x}) for t, x in zip(tasks, inputs)]
        out = {}
        groups = (
            [[i for i, x in enumerate(items) if x[0] == t] for t in dict.fromkeys(tasks)]
            if model.state.head_modules
            else [list(range(len(items)))]
        )
        for group in groups:  # per-task heads: one task per generation
            for start in range(0, len(group), batch_size):
                idx = group[start : start + batch_size]
                texts, _ = self._generate(model, tok, [items[i] for i in idx], max_length, max_new_tokens, True)
                out.update(zip(idx, texts))
        return [out[i] for i in range(len(items))]

    @torch.no_grad()
    def score(self, model, tok, items, *, max_length, batch_size=64, max_new_tokens=16, mixed=True):
        tallies: dict[str, _Tally] = {}
        mixed = mixed and isinstance(model, ShareModel)
        if mixed and model.state.head_modules:
            groups = [
                [x for x in items if x[0] == t] for t in dict.fromkeys(x[0] for x in items)
            ]  # per-task heads: one task per generation
        else:
            groups = [items]
        for group in groups:
            for chunk in _chunks(group, batch_size):
                for (t, spec, row), text, gap in zip(
                    chunk, *self._generate(model, tok, chunk, max_length, max_new_tokens, mixed)
                ):
                    tallies.setdefault(t, _Tally()).add(
                        completion_metric(spec.metric, text, row[spec.completion_field]), gap
                    )
        return {t: tally.result() for t, tally in tallies.items()}

    def _generate(
        self, model, tok, chunk: list[Item], max_length: int, max_new_tokens: int, mixed: bool
    ) -> tuple[list[str], list[float]]:
        """Greedy completions of a left-padded batch, and each row's smallest top-2 logit gap
        over the tokens it generated (up to and including its EOS)."""
        device = next(model.parameters()).device
        stops = stop_ids(tok, model)
        prompts = [self.prompt_ids(tok, spec, row, max_length) for _, spec, row in chunk]
        width, pad = max(map(len, prompts)), tok.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
        attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        kwargs = dict(
            input_ids=input_ids,
            attention_mask=attention,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=stops,
            output_scores=True,
            return_dict_in_generate=True,
        )
        if not mixed:
            out = (model.model if isinstance(model, ShareModel) else model).generate(**kwargs)
        elif model.state.head_modules:  # the chunk is one task's
            model.activate(chunk[0][0])
            out = model.model.generate(**kwargs)
        else:
            with model.mixed([t for t, _, _ in chunk]):
                out = model.model.generate(**kwargs)
        new = out.sequences[:, width:].cpu()
        gaps = torch.stack(
            [_top2_gap(step) for step in out.scores], 1
        ).cpu()  # rows × steps: the gap of the scores greedy decoding chose from
        texts, margins = [], []
        for i in range(len(chunk)):
            ids = new[i].tolist()
            end = next((j + 1 for j, x in enumerate(ids) if x in stops), len(ids))
            texts.append(tok.decode(ids[:end], skip_special_tokens=True).strip())
            margins.append(float(gaps[i, :end].min()) if end else math.inf)
        return texts, margins


for _f in (SequenceClassification(), CausalLM()):
    register_family(_f)
    register_task_type(_f.name, _f.spec_fields, _f.metrics, _f.labelled)
FAMILIES: dict[str, Family] = _FAMILIES  # every registered family by name


def family_of(spec: TaskSpec) -> Family:
    return family(spec.type)
