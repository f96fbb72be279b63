"""A deterministic generator of small English text-classification tasks (the embedded default
data for tests, the demo and the benchmarks), written in the storage format of DESIGN §4.

Each task draws sentences from templates over a shared vocabulary, so tasks overlap in words
but differ in what decides the label (sentiment, topic, sentence type, tense, grammatical
number, intent, urgency). Hard cases keep them from being trivial: negation flips sentiment and
"A but B" takes B's verdict, a side remark from another topic precedes the main clause,
questions lose their question mark while reported questions are statements, tense adverbs are
dropped, and a few percent of the training labels are noisy.

It also generates small instruction (causal-LM) tasks: rows {"prompt", "completion"} with
completions of 1-4 words, over one shared vocabulary (`INSTRUCTION_VOCABULARY`, which
`synthetic.tiny_causal_lm` turns into a word-level tokenizer). Each task has its own prompt
keyword and its own rule, so learning one does not answer another: transforms of a word list
that ends with "=" (reverse a colour-thing-name triple, the last word, the one name), key →
value lookups (plural, antonym, a made-up capital table, the next number word) and templated
answers (greet a name; count on from a number, scored with ROUGE-L). A tiny random Llama
(`synthetic.tiny_causal_lm`) learns each of them with a rank-8 LoRA in 150 CPU steps
(tests/test_tasks.py has the recipe).

Same (name, seed) → byte-identical files on every machine.

Why one module of ~480 lines: each task's vocabulary sits next to the template that uses it, so a
task reads top to bottom in one place; the two generators (labelled and instruction tasks) share
the writer at the end.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Callable
from pathlib import Path

from .taskdata import CAUSAL_LM, CLASSIFICATION, TaskSpec, write_task

Example = tuple[str, str]  # (text, label)

PEOPLE = [
    "the teacher",
    "my neighbour",
    "our manager",
    "the driver",
    "a student",
    "the doctor",
    "my sister",
    "the chef",
    "an engineer",
    "the pilot",
]
PLACES = [
    "in the city",
    "at the station",
    "near the river",
    "at home",
    "in the office",
    "on the bus",
    "at school",
    "downtown",
]
FILLER = ["today", "this morning", "again", "as usual", "after lunch", "on monday", "for a while", "with friends"]


def _pick(rng: random.Random, xs: list[str]) -> str:
    return xs[rng.randrange(len(xs))]


def _sentiment(rng: random.Random) -> Example:
    things = [
        "the movie",
        "the dinner",
        "the concert",
        "this phone",
        "the hotel",
        "the book",
        "the service",
        "the game",
        "the trip",
        "the new album",
    ]
    good = ["wonderful", "excellent", "delightful", "fantastic", "great", "lovely", "superb", "enjoyable"]
    bad = ["terrible", "awful", "boring", "disappointing", "horrible", "dreadful", "poor", "annoying"]

    def clause(positive: bool) -> str:
        negate = rng.random() < 0.3  # "not great" is negative: the adjective alone does not decide
        word = _pick(rng, good if positive != negate else bad)
        verb = "was not" if negate else _pick(rng, ["was", "was really", "felt", "seemed"])
        return f"{_pick(rng, things)} {verb} {word}"

    label = rng.choice(["positive", "negative"])
    if rng.random() < 0.3:  # contrast: the clause after "but" carries the verdict
        return f"{clause(label == 'negative')} but {clause(label == 'positive')}", label
    tail = _pick(rng, ["", " " + _pick(rng, FILLER), ", said " + _pick(rng, PEOPLE)])
    return f"{clause(label == 'positive')}{tail}", label


TOPICS = {
    "sports": [
        "the team won the match",
        "the striker scored twice",
        "the coach praised the players",
        "the race ended in a sprint",
        "the tennis final was close",
        "fans filled the stadium",
    ],
    "politics": [
        "the senate passed the bill",
        "the minister announced a reform",
        "voters went to the polls",
        "the party chose a new leader",
        "the debate focused on taxes",
        "parliament rejected the budget",
    ],
    "technology": [
        "the company released a new chip",
        "engineers fixed the software bug",
        "the app update added encryption",
        "the startup trained a larger model",
        "the laptop battery lasts longer",
        "the network outage was repaired",
    ],
    "food": [
        "the bakery sells fresh bread",
        "the soup needed more salt",
        "the chef cooked a spicy curry",
        "the market had ripe tomatoes",
        "the pasta was served with basil",
        "the cafe roasts its own coffee",
    ],
}


def _topic(rng: random.Random) -> Example:
    label = rng.choice(sorted(TOPICS))
    lead = _pick(rng, ["", "reports say ", "according to " + _pick(rng, PEOPLE) + ", ", "yesterday "])
    if rng.random() < 0.3:  # a side remark from another topic; the main clause decides
        other = rng.choice([t for t in sorted(TOPICS) if t != label])
        lead = f"even though {_pick(rng, TOPICS[other])}, "
    return f"{lead}{_pick(rng, TOPICS[label])} {_pick(rng, FILLER)}", label


def _question(rng: random.Random) -> Example:
    person, place = _pick(rng, PEOPLE), _pick(rng, PLACES)
    act = _pick(
        rng, ["read the report", "take the train", "call the office", "finish the work", "stay late", "buy the tickets"]
    )
    if rng.random() < 0.5:
        aux = _pick(rng, ["did", "will", "can", "should", "does", "why did", "when will", "where can"])
        text = f"{aux} {person} {act} {place}"
        return (text + "?" if rng.random() < 0.3 else text), "question"  # most lose their "?"
    if rng.random() < 0.4:  # reported questions are statements
        verb = _pick(rng, ["asked why", "wondered when", "knows where", "asked if"])
        return (
            f"{_pick(rng, PEOPLE)} {verb} {person} {_pick(rng, ['did', 'would', 'could'])} {act} {place}",
            "statement",
        )
    aux = _pick(rng, ["did", "will", "can", "should", "often"])
    return f"{person} {aux} {act} {place}", "statement"


TENSES = {  # verb: (past, present, future)
    "walk": ("walked", "walks", "will walk"),
    "cook": ("cooked", "cooks", "will cook"),
    "write": ("wrote", "writes", "will write"),
    "drive": ("drove", "drives", "will drive"),
    "sing": ("sang", "sings", "will sing"),
    "build": ("built", "builds", "will build"),
    "visit": ("visited", "visits", "will visit"),
    "paint": ("painted", "paints", "will paint"),
}
TIME_WORDS = {
    "past": ["yesterday", "last week", "two days ago"],
    "present": ["every day", "usually", "on weekends"],
    "future": ["tomorrow", "next week", "soon"],
}


def _tense(rng: random.Random) -> Example:
    label = rng.choice(["past", "present", "future"])
    verb = TENSES[_pick(rng, sorted(TENSES))][["past", "present", "future"].index(label)]
    when = _pick(rng, TIME_WORDS[label]) if rng.random() < 0.5 else ""  # half carry no time word
    return " ".join(w for w in (_pick(rng, PEOPLE), verb, _pick(rng, PLACES), when) if w), label


NOUNS = [
    ("dog", "dogs"),
    ("child", "children"),
    ("car", "cars"),
    ("bird", "birds"),
    ("worker", "workers"),
    ("box", "boxes"),
    ("mouse", "mice"),
    ("woman", "women"),
]


def _number(rng: random.Random) -> Example:
    label = rng.choice(["singular", "plural"])
    noun = _pick(rng, NOUNS)[label == "plural"]
    verb = _pick(rng, [("is", "are"), ("was", "were"), ("has", "have"), ("looks", "look")])[label == "plural"]
    det = _pick(rng, ["the", "that", "this"] if label == "singular" else ["the", "those", "these", "some"])
    rest = _pick(rng, ["outside", "very quiet", "a problem", "tired", "ready", "new"])
    return f"{det} {noun} {_pick(rng, PLACES)} {verb} {rest}", label


INTENTS = {
    "greeting": ["hello there", "good morning everyone", "hi, nice to meet you", "hey, how are you", "good evening"],
    "request": [
        "could you send me the file",
        "please book a table",
        "can you help me with the form",
        "would you close the window",
        "please call me back",
    ],
    "complaint": [
        "the package arrived broken",
        "nobody answered my email",
        "the room was dirty",
        "i was charged twice",
        "the train was late again",
    ],
    "thanks": [
        "thank you so much",
        "thanks for the help",
        "i really appreciate it",
        "many thanks for the quick reply",
        "thanks a lot",
    ],
}


def _intent(rng: random.Random) -> Example:
    label = rng.choice(sorted(INTENTS))
    return f"{_pick(rng, INTENTS[label])} {_pick(rng, FILLER)}", label


def _urgency(rng: random.Random) -> Example:
    label = rng.choice(["urgent", "routine"])
    issue = _pick(
        rng, ["the server", "the printer", "the water pipe", "the payment system", "the alarm", "the elevator"]
    )
    if label == "urgent":
        state = _pick(
            rng,
            [
                "is down and customers are waiting",
                "is on fire",
                "stopped working right now",
                "is leaking everywhere",
                "failed during the launch",
            ],
        )
        lead = _pick(rng, ["", "immediately: ", "asap, ", "emergency: "])
    else:
        state = _pick(
            rng,
            [
                "needs a check next month",
                "could be cleaned sometime",
                "has a small scheduled update",
                "is due for maintenance",
                "works but is a bit slow",
            ],
        )
        lead = _pick(rng, ["", "no rush: ", "when you have time, ", "fyi, "])
    return f"{lead}{issue} {state}", label


GENERATORS: dict[str, tuple[tuple[str, ...], Callable[[random.Random], Example]]] = {
    "sentiment": (("negative", "positive"), _sentiment),
    "topic": (("food", "politics", "sports", "technology"), _topic),
    "question": (("question", "statement"), _question),
    "tense": (("future", "past", "present"), _tense),
    "number": (("plural", "singular"), _number),
    "intent": (("complaint", "greeting", "request", "thanks"), _intent),
    "urgency": (("routine", "urgent"), _urgency),
}
TASK_NAMES: tuple[str, ...] = tuple(GENERATORS)
LABEL_NOISE = 0.05  # fraction of training labels replaced by a random other label


# ---- instruction (causal-LM) tasks: (prompt, completion) pairs over one small shared vocabulary ----
Pair = tuple[str, str]  # (prompt, completion)

COLORS = ["red", "blue", "green", "yellow", "black", "white", "pink", "gray"]
THINGS = ["cat", "dog", "bird", "fox", "cow", "horse", "tree", "box"]
LIST_WORDS = COLORS + THINGS  # the words of the list transforms
NAMES = ["anna", "ben", "carl", "dora", "eve", "finn", "gina", "hugo", "ida", "jack"]
NUMBER_WORDS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve"]
PLURALS = {
    "cat": "cats",
    "dog": "dogs",
    "bird": "birds",
    "fox": "foxes",
    "box": "boxes",
    "tree": "trees",
    "mouse": "mice",
    "child": "children",
    "man": "men",
    "foot": "feet",
    "tooth": "teeth",
    "city": "cities",
}
_ANTONYM_PAIRS = [
    ("hot", "cold"),
    ("big", "small"),
    ("fast", "slow"),
    ("up", "down"),
    ("old", "new"),
    ("happy", "sad"),
    ("light", "dark"),
    ("early", "late"),
    ("open", "closed"),
    ("full", "empty"),
]
ANTONYMS = {**dict(_ANTONYM_PAIRS), **{b: a for a, b in _ANTONYM_PAIRS}}
CAPITALS = {
    "zorland": "mivo",
    "quentia": "paldo",
    "vextia": "rumo",
    "olbara": "sarn",
    "drestia": "kolvi",
    "mirwen": "tobe",
    "ulgaria": "fenna",
    "prasko": "lidu",
}  # made up: nothing to know beforehand


def _list(rng: random.Random, n: int) -> list[str]:
    return [_pick(rng, LIST_WORDS) for _ in range(n)]


def _reverse(rng: random.Random) -> Pair:
    words = [
        _pick(rng, COLORS),
        _pick(rng, THINGS),
        _pick(rng, NAMES),
    ]  # one word of each kind: a tiny model can tell them apart
    return f"reverse : {' '.join(words)} =", " ".join(reversed(words))


def _last_word(rng: random.Random) -> Pair:
    words = _list(rng, rng.choice([3, 4]))
    return f"last word : {' '.join(words)} =", words[-1]


def _find_name(rng: random.Random) -> Pair:
    words = _list(rng, 2)
    name = _pick(rng, NAMES)
    words.insert(rng.randrange(3), name)
    return f"find name : {' '.join(words)} =", name


def _plural(rng: random.Random) -> Pair:
    noun = _pick(rng, sorted(PLURALS))
    return f"plural of {noun}", PLURALS[noun]


def _antonym(rng: random.Random) -> Pair:
    word = _pick(rng, sorted(ANTONYMS))
    return f"opposite of {word}", ANTONYMS[word]


def _capital(rng: random.Random) -> Pair:
    country = _pick(rng, sorted(CAPITALS))
    return f"capital of {country}", CAPITALS[country]


def _successor(rng: random.Random) -> Pair:
    i = rng.randrange(len(NUMBER_WORDS) - 1)
    return f"number after {NUMBER_WORDS[i]}", NUMBER_WORDS[i + 1]


def _greet(rng: random.Random) -> Pair:
    name = _pick(rng, NAMES)
    return f"greet {name}", f"hello {name}"


def _count(rng: random.Random) -> Pair:
    i = rng.randrange(len(NUMBER_WORDS) - 3)
    return f"count from {NUMBER_WORDS[i]}", " ".join(NUMBER_WORDS[i : i + 4])


INSTRUCTION_GENERATORS: dict[str, Callable[[random.Random], Pair]] = {
    "reverse": _reverse,
    "last_word": _last_word,
    "find_name": _find_name,
    "plural": _plural,
    "antonym": _antonym,
    "capital": _capital,
    "successor": _successor,
    "greet": _greet,
    "count": _count,
}
INSTRUCTION_METRICS: dict[str, str] = {name: "exact_match" for name in INSTRUCTION_GENERATORS} | {
    "count": "rouge_l"
}  # partial credit for 4-word answers
INSTRUCTION_TASK_NAMES: tuple[str, ...] = tuple(INSTRUCTION_GENERATORS)
_TEMPLATE_WORDS = [
    "reverse",
    ":",
    "=",
    "last",
    "word",
    "find",
    "name",
    "plural",
    "of",
    "opposite",
    "capital",
    "number",
    "after",
    "greet",
    "hello",
    "count",
    "from",
]


INSTRUCTION_VOCABULARY: list[str] = sorted(
    set(_TEMPLATE_WORDS)
    | set(LIST_WORDS)
    | set(NAMES)
    | set(NUMBER_WORDS)
    | set(PLURALS)
    | set(PLURALS.values())
    | set(ANTONYMS)
    | set(CAPITALS)
    | set(CAPITALS.values())
)  # every token of every instruction prompt and completion (the tiny model's vocabulary)
ALL_TASK_NAMES: tuple[str, ...] = TASK_NAMES + INSTRUCTION_TASK_NAMES


def generate_task(
    name: str, seed: int = 0, n_train: int = 256, n_eval: int = 128
) -> tuple[TaskSpec, list[dict], list[dict]]:
    """(spec, train rows, eval rows) of task `name` (classification or instruction); deterministic in (name, seed)."""
    if name not in GENERATORS and name not in INSTRUCTION_GENERATORS:
        raise ValueError(f"unknown task {name!r}; known tasks: {list(ALL_TASK_NAMES)}")
    rng = random.Random(zlib.crc32(f"{name}/{seed}".encode()))
    if name in INSTRUCTION_GENERATORS:
        pair = INSTRUCTION_GENERATORS[name]
        spec = TaskSpec(
            name=name,
            type=CAUSAL_LM,
            metric=INSTRUCTION_METRICS[name],
            prompt_field="prompt",
            completion_field="completion",
        )

        def pairs(n: int) -> list[dict]:
            return [{"prompt": p, "completion": c} for p, c in (pair(rng) for _ in range(n))]

        return spec, pairs(n_train), pairs(n_eval)
    labels, gen = GENERATORS[name]
    spec = TaskSpec(name=name, type=CLASSIFICATION, labels=labels)

    def rows(n: int, noise: float) -> list[dict]:
        out = []
        for _ in range(n):
            text, label = gen(rng)
            if rng.random() < noise:
                label = rng.choice([x for x in labels if x != label])
            out.append({"text": " ".join(text.split()), "label": label})
        return out

    return spec, rows(n_train, LABEL_NOISE), rows(n_eval, 0.0)


def generate_tasks(
    root: Path, names: list[str] | None = None, seed: int = 0, n_train: int = 256, n_eval: int = 128
) -> list[Path]:
    """Write each task as <root>/<name>/{train.jsonl, eval.jsonl, task.yaml}; the directories.
    `names` may mix classification and instruction tasks; the default is every classification task."""
    out = []
    for name in names or list(TASK_NAMES):
        spec, train, eval_rows = generate_task(name, seed, n_train, n_eval)
        write_task(Path(root) / name, spec, train, eval_rows)
        out.append(Path(root) / name)
    return out
