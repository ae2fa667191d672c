"""Fine-tuning by task format (the paper's Table 3): does fine-tuning lower the discrepancy,
most for classification-format tasks and least for tasks that bring new knowledge?

    python -m experiments.finetuning --quick      # < 2 min: CI smoke test
    python -m experiments.finetuning --out docs/replication/finetuning.json \
        --plot docs/replication/finetuning.png

A tiny byte-level LLaMA is pre-trained on stdlib sources (the calibration's base), then
fine-tuned with the same steps, learning rate and seeds on three tasks made from other stdlib
files, in the formats of the paper's three:
- classification (IMDB's format): a line of code, then its kind from a closed set of labels;
- extraction / QA (SQuAD's): a line as context, a question, and the answer copied from it;
- translation-like (OpusBooks'): an English line from comments and docstrings, then the same
  words in a made-up language (a fixed word-by-word vocabulary the base has never seen).
Every fine-tune is compared with one baseline of the base (docs/gate.md, "Protocol": K cold fits,
warm refits and null refits): the relative change of the mean distance for the query (q_proj) and
value (v_proj) matrices, for the first and last layers and per depth third, and for all layers. Each
task's loss before and after shows that the task was learned.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from experiments._cli import experiment_main, pyplot, save_figure
from tests import zoo

# Not in the base corpus (zoo.CORPUS_MODULES); present from Python 3.10 through 3.13.
TASK_MODULES = (
    "ast.py",
    "email/message.py",
    "enum.py",
    "http/client.py",
    "logging/__init__.py",
    "pprint.py",
    "urllib/parse.py",
)
TASK_BYTES = 60_000  # each task's corpus is cut to the same size
TYPES = ("query", "value")

_PROSE = re.compile(r"^[A-Za-z][A-Za-z ,.'-]*$")
_DEFINES = re.compile(r"^(?:async\s+)?(?:def|class)\s+([A-Za-z_]\w*)")
_ASSIGNS = re.compile(r"^([A-Za-z_][\w.]*)\s*=[^=]")
_SYLLABLES = tuple(c + v for c in "bdfgklmnprstvz" for v in "aeiou")


def _source_lines() -> list[str]:
    root = Path(os.__file__).parent
    lines = []
    for name in TASK_MODULES:
        path = root / name
        if path.is_file():
            text = path.read_text(encoding="utf-8", errors="replace")
            lines += [line.strip() for line in text.splitlines()]
    return [line for line in lines if 8 <= len(line) <= 72 and line.isascii()]


def _kind(line: str) -> str:
    if line.startswith(("def ", "async def ")):
        return "function"
    if line.startswith("class "):
        return "class"
    if line.startswith(("import ", "from ")):
        return "import"
    if line.startswith("return"):
        return "return"
    if line.startswith("#"):
        return "comment"
    if line.startswith(("if ", "elif ", "else", "for ", "while ", "try", "except", "with ")):
        return "control"
    return "assignment" if _ASSIGNS.match(line) else "other"


def classification(lines: list[str]) -> list[str]:
    return [f"code: {line}\nkind: {_kind(line)}\n" for line in lines]


def extraction(lines: list[str]) -> list[str]:
    out = []
    for line in lines:
        if match := _DEFINES.match(line):
            out.append(f"context: {line}\nquestion: which name is defined?\n"
                       f"answer: {match.group(1)}\n")  # fmt: skip
        elif match := _ASSIGNS.match(line):
            out.append(f"context: {line}\nquestion: which name is assigned?\n"
                       f"answer: {match.group(1)}\n")  # fmt: skip
    return out


def _word(english: str) -> str:
    """A made-up word for an English one: two or three syllables picked by its hash."""
    digest = hashlib.sha256(english.lower().encode()).digest()
    count = 2 + digest[0] % 2
    return "".join(_SYLLABLES[digest[1 + i] % len(_SYLLABLES)] for i in range(count))


def translation(lines: list[str]) -> list[str]:
    out = []
    for line in lines:
        prose = line.lstrip("#").strip().strip('"')
        words = re.findall(r"[A-Za-z]+", prose)
        if _PROSE.match(prose) and len(words) >= 3:
            out.append(f"en: {prose}\nxx: {' '.join(_word(w) for w in words)}\n")
    return out


TASKS: dict[str, Callable[[list[str]], list[str]]] = {
    "classification": classification,
    "extraction": extraction,
    "translation": translation,
}


def task_text(name: str, seed: int = 0) -> bytes:
    """A task's corpus: its examples in a seeded order, cut to ``TASK_BYTES``."""
    examples = TASKS[name](_source_lines())
    random.Random(seed).shuffle(examples)
    return "\n".join(examples).encode()[:TASK_BYTES]


def run(quick: bool, work: Path) -> dict[str, Any]:
    import dynaudit

    settings = zoo.replication_settings(quick)  # K fit seeds are the baseline's K
    steps, seeds = (30, (0,)) if quick else (200, (0, 1))
    lr = 3e-4
    started = time.perf_counter()
    base = work / "base"
    zoo.train_tiny_llama(base, steps=150 if quick else 400)
    baseline = work / "baseline"
    dynaudit.baseline(base, baseline, **settings)
    texts = {name: task_text(name) for name in TASKS}
    base_loss = {name: zoo.lm_loss(base, text=text) for name, text in texts.items()}
    rows = []
    for name, text in texts.items():
        for seed in seeds:
            out = work / f"{name}-{seed}"
            zoo.finetune_tiny_llama(base, out, text=text, steps=steps, lr=lr, seed=seed)
            report = dynaudit.check(out, baseline)
            comparison = report.comparison
            rows.append({
                "task": name, "seed": seed, "verdict": report.verdict.verdict,
                "task_loss_before": base_loss[name], "task_loss_after": zoo.lm_loss(out, text=text),
                "base_corpus_loss": zoo.lm_loss(out),
                "all": comparison.all.change.mean if comparison.all.change else None,
                "all_std": comparison.all.change.std if comparison.all.change else None,
                "layers": [{"name": x.name, "type": x.type, "depth": x.depth, "group": x.group,
                            "change": x.change.mean if x.change else None,
                            "std": x.change.std if x.change else None}
                           for x in comparison.layers],
            })  # fmt: skip
            print(f"{name} seed {seed}: all layers {rows[-1]['all'] * 100:+.2f}% "
                  f"(± {rows[-1]['all_std'] * 100:.2f}), task loss {base_loss[name]:.3f} → "
                  f"{rows[-1]['task_loss_after']:.3f}", flush=True)  # fmt: skip
    return {
        "settings": settings, "finetune": {"steps": steps, "lr": lr},
        "seeds": list(seeds), "base_corpus_loss": zoo.lm_loss(base), "rows": rows,
        "summary": summarize(rows), "seconds": round(time.perf_counter() - started, 1),
    }  # fmt: skip


def _cells(layers: list[dict[str, Any]]) -> dict[str, float | None]:
    """Mean relative change of the given layers: first and last layer, each third, all."""
    if not layers:
        return {}
    first, last = min(x["depth"] for x in layers), max(x["depth"] for x in layers)

    def mean(chosen: list[dict[str, Any]]) -> float | None:
        values = [x["change"] for x in chosen if x["change"] is not None]
        return statistics.fmean(values) if values else None

    return {
        "first": mean([x for x in layers if x["depth"] == first]),
        "last": mean([x for x in layers if x["depth"] == last]),
        **{g: mean([x for x in layers if x["group"] == g]) for g in ("bottom", "middle", "top")},
        "all": mean(layers),
    }


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per task and matrix type (and all types): the cells of :func:`_cells`, averaged over
    fine-tune seeds, with the spread over those seeds and the largest fit-seed std."""
    out: dict[str, Any] = {}
    for task in TASKS:
        mine = [r for r in rows if r["task"] == task]
        if not mine:
            continue
        per_type = {}
        for kind in (*TYPES, "all types"):
            runs = [
                _cells([x for x in r["layers"] if kind == "all types" or x["type"] == kind])
                for r in mine
            ]
            per_type[kind] = {
                cell: statistics.fmean(v) if (v := [c[cell] for c in runs if c[cell] is not None])
                else None
                for cell in runs[0]
            }  # fmt: skip
            per_type[kind]["all_seed_std"] = (
                statistics.pstdev(c["all"] for c in runs) if len(runs) > 1 else 0.0
            )
        out[task] = {
            **per_type,
            "fit_seed_std_max": max(x["std"] or 0.0 for r in mine for x in r["layers"]),
            "task_loss": [statistics.fmean(r["task_loss_before"] for r in mine),
                          statistics.fmean(r["task_loss_after"] for r in mine)],
            "base_corpus_loss": statistics.fmean(r["base_corpus_loss"] for r in mine),
        }  # fmt: skip
    return out


def show(result: dict[str, Any]) -> None:
    print(f"{'task':15} {'type':9} {'first':>8} {'last':>8} {'bottom':>8} {'middle':>8} "
          f"{'top':>8} {'all':>8}  task loss")  # fmt: skip
    for task, item in result["summary"].items():
        for kind in (*TYPES, "all types"):
            cells = item[kind]
            text = " ".join(
                f"{cells[c] * 100:+7.2f}%" if cells[c] is not None else f"{'—':>8}"
                for c in ("first", "last", "bottom", "middle", "top", "all")
            )
            loss = item["task_loss"]
            print(f"{task:15} {kind:9} {text}  {loss[0]:.3f} → {loss[1]:.3f}")


def plot(result: dict[str, Any], out: Path) -> None:
    plt = pyplot()
    cells = ("first", "bottom", "middle", "top", "last", "all")
    fig, axes = plt.subplots(1, len(TYPES) + 1, figsize=(13, 4), sharey=True)
    width = 0.8 / max(1, len(result["summary"]))
    for ax, kind in zip(axes, (*TYPES, "all types"), strict=True):
        for i, (task, item) in enumerate(result["summary"].items()):
            values = [(item[kind][c] or 0.0) * 100 for c in cells]
            ax.bar([j + i * width for j in range(len(cells))], values, width, label=task)
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_xticks([j + width for j in range(len(cells))], cells, fontsize=8)
        ax.set_title(kind)
    axes[0].set_ylabel("change of the mean distance vs the base (%)")
    axes[0].legend(fontsize=7)
    fig.suptitle("Fine-tuning a tiny LLaMA on three task formats")
    save_figure(fig, out)


def main(argv: list[str] | None = None) -> None:
    experiment_main(__doc__, "finetuning", run, show, plot, argv=argv)


if __name__ == "__main__":
    main()
