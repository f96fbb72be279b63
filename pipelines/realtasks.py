"""Real instruction tasks from the Unicode CLDR data that the `babel` package ships (offline).

Every answer is CLDR data, read through babel: how a locale writes a date, a number, an amount
of money, a percentage, a list, a time of day; what a region or currency code is called; which
currency a territory uses. The inputs (dates, amounts, which words to list) are drawn with a
seeded generator, so the same (task, seed) gives byte-identical files on every machine with the
same babel version. The tasks are written in the storage format (task.yaml + JSONL; DESIGN §4),
ready to land.

Data licence: the CLDR data is © Unicode, Inc., under the Unicode License v3
(https://www.unicode.org/license.txt), as babel redistributes it (babel's code: BSD-3-Clause).

    python -m pipelines.realtasks --out landings-real [--tasks date_de,number_in] [--n-train 256 --n-eval 64]
"""

from __future__ import annotations

import datetime as dt
import random
import zlib
from collections.abc import Callable
from pathlib import Path

import typer
from babel import Locale, dates, lists, numbers

from share_core.taskdata import CAUSAL_LM, TaskSpec, write_task

LICENSE = "Unicode CLDR data via babel: Unicode License v3 (https://www.unicode.org/license.txt)"
Pair = tuple[str, str]  # (prompt, completion)
EN = Locale("en")
WORDS = ["apples", "bread", "cheese", "milk", "eggs", "rice", "tea", "salt", "honey", "beans", "olives", "lemons"]
_REGIONS = sorted(
    code
    for code in EN.territories
    if len(code) == 2 and code.isalpha() and code not in ("ZZ", "EU", "EZ", "UN", "QO") and not code.startswith("X")
)


def _date(rng: random.Random) -> dt.date:
    return dt.date(1950, 1, 1) + dt.timedelta(days=rng.randrange(365 * 80))


def _amount(rng: random.Random) -> float:
    return round(rng.uniform(1, 10 ** rng.randint(2, 6)), 2)


def _date_task(locale: str, fmt: str, language: str) -> Callable[[random.Random], Pair]:
    def make(rng: random.Random) -> Pair:
        d = _date(rng)
        return f"Write the date {d.isoformat()} in {language} {fmt} format.", dates.format_date(d, fmt, locale=locale)

    return make


def _number_task(locale: str, where: str) -> Callable[[random.Random], Pair]:
    def make(rng: random.Random) -> Pair:
        x = round(rng.uniform(1000, 10**7), 3)
        return f"Write the number {x:.3f} as it is written in {where}.", numbers.format_decimal(x, locale=locale)

    return make


def _currency_task(code: str, locale: str, where: str) -> Callable[[random.Random], Pair]:
    def make(rng: random.Random) -> Pair:
        x = _amount(rng)
        return (
            f"Write the amount {x:.2f} {code} as a price in {where}.",
            numbers.format_currency(x, code, locale=locale),
        )

    return make


def _percent_task(locale: str, where: str) -> Callable[[random.Random], Pair]:
    def make(rng: random.Random) -> Pair:
        x = rng.randrange(1, 1000) / 1000
        return f"Write the fraction {x:.3f} as a percentage as written in {where}.", numbers.format_percent(
            x, locale=locale
        )

    return make


def _list_task(locale: str, language: str) -> Callable[[random.Random], Pair]:
    def make(rng: random.Random) -> Pair:
        items = rng.sample(WORDS, rng.randint(2, 4))
        return f"Join these words into a list in {language} style: {'; '.join(items)}", lists.format_list(
            items, locale=locale
        )

    return make


def _time_task(locale: str, where: str) -> Callable[[random.Random], Pair]:
    def make(rng: random.Random) -> Pair:
        t = dt.time(rng.randrange(24), rng.randrange(60))
        return f"Write the time {t.strftime('%H:%M')} as a clock time in {where}.", dates.format_time(
            t, "short", locale=locale
        )

    return make


def _region_name(rng: random.Random) -> Pair:
    code = rng.choice(_REGIONS)
    return f"Which country or region has the ISO code {code}? Answer with its name.", EN.territories[code]


def _region_code(rng: random.Random) -> Pair:
    code = rng.choice(_REGIONS)
    return f"Give the two-letter ISO code of {EN.territories[code]}.", code


_CURRENCIES = sorted(
    c for c in EN.currencies if len(c) == 3 and c.isupper() and c not in ("XXX", "XTS") and not c.startswith("X")
)


def _currency_name(rng: random.Random) -> Pair:
    code = rng.choice(_CURRENCIES)
    return f"What is the English name of the currency with code {code}?", EN.currencies[code]


def _territory_currency(rng: random.Random) -> Pair:
    while True:
        code = rng.choice(_REGIONS)
        current = numbers.get_territory_currencies(code, dt.date(2024, 1, 1))
        if current:
            return f"Which currency code does {EN.territories[code]} use?", current[0]


def _language_name(rng: random.Random) -> Pair:
    codes = sorted(c for c in EN.languages if len(c) == 2)
    code = rng.choice(codes)
    return f"Which language has the ISO 639 code {code}? Answer with its English name.", EN.languages[code]


TASKS: dict[str, Callable[[random.Random], Pair]] = {
    "date_de_short": _date_task("de_DE", "short", "German"),
    "date_us_short": _date_task("en_US", "short", "US English"),
    "date_fr_long": _date_task("fr_FR", "long", "French"),
    "date_es_long": _date_task("es_ES", "long", "Spanish"),
    "date_ja_medium": _date_task("ja_JP", "medium", "Japanese"),
    "number_de": _number_task("de_DE", "Germany"),
    "number_in": _number_task("en_IN", "India"),
    "number_ch": _number_task("de_CH", "Switzerland"),
    "price_de_eur": _currency_task("EUR", "de_DE", "Germany"),
    "price_jp_jpy": _currency_task("JPY", "ja_JP", "Japan"),
    "price_ch_chf": _currency_task("CHF", "de_CH", "Switzerland"),
    "percent_de": _percent_task("de_DE", "Germany"),
    "list_fr": _list_task("fr", "French"),
    "list_de": _list_task("de", "German"),
    "time_us": _time_task("en_US", "the United States"),
    "region_name": _region_name,
    "region_code": _region_code,
    "currency_name": _currency_name,
    "territory_currency": _territory_currency,
    "language_name": _language_name,
}
METRIC = "exact_match"


def examples(name: str, seed: int, n: int) -> list[dict]:
    """`n` distinct rows of task `name` (fewer when the task has fewer distinct prompts)."""
    rng = random.Random(zlib.crc32(f"{name}:{seed}".encode()))
    make, seen, rows = TASKS[name], set(), []
    for _ in range(n * 20):
        prompt, completion = make(rng)
        if prompt not in seen:
            seen.add(prompt)
            rows.append({"prompt": prompt, "completion": completion})
            if len(rows) == n:
                break
    return rows


def generate_real_task(out: Path, name: str, seed: int = 0, n_train: int = 256, n_eval: int = 64) -> Path:
    """Write task `name` to out/name: disjoint train and eval prompts (eval drawn first)."""
    if name not in TASKS:
        raise ValueError(f"unknown real task {name!r}; known: {', '.join(TASKS)}")
    rows = examples(name, seed, n_train + n_eval)
    if len(rows) < n_eval + 8:
        raise ValueError(f"task {name}: only {len(rows)} distinct rows")
    eval_rows, train_rows = rows[:n_eval], rows[n_eval:]
    write_task(out / name, TaskSpec(name=name, type=CAUSAL_LM, metric=METRIC), train_rows, eval_rows)
    return out / name


def generate_real_tasks(
    out: Path, names: list[str] | None = None, seed: int = 0, n_train: int = 256, n_eval: int = 64
) -> list[Path]:
    return [generate_real_task(Path(out), n, seed, n_train, n_eval) for n in names or list(TASKS)]


app = typer.Typer(add_completion=False, help=__doc__)


@app.command()
def main(
    out: Path = typer.Option(Path("landings-real"), help="where to write <task>/ directories"),
    tasks: str = typer.Option("", help="comma-separated task names (default: all)"),
    seed: int = typer.Option(0),
    n_train: int = typer.Option(256),
    n_eval: int = typer.Option(64),
) -> None:
    """Write real CLDR instruction tasks in the storage format."""
    names = [t for t in tasks.split(",") if t] or None
    dirs = generate_real_tasks(out, names, seed, n_train, n_eval)
    typer.echo(f"wrote {len(dirs)} tasks to {out} ({LICENSE})")


if __name__ == "__main__":
    app()
