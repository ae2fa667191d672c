"""``python -m bench.reliability``: false alarms, damage detection and bad inputs, as tables.

Every case runs the real ``dynaudit`` command line on checkpoints written by real producers;
tests/test_reliability.py runs the same cases. Needs the ``[test]`` extra (transformers, peft).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

from rich.console import Console
from rich.table import Table

from bench.reliability import CASES, TABLES
from bench.reliability.core import Outcome, Workspace

TITLES = {
    "alarms": "False alarms: base models re-checked against their own baselines (goal: 0 flagged)",
    "damage": "Damage detection: expected verdict vs actual (goal: all as expected)",
    "inputs": "Bad inputs: exit code and message (goal: all as documented, nothing lost)",
    "secrets": "Secrets: tokens set for HF and MLflow (goal: never written anywhere)",
    "round2": "Round two (issue 18): false pass, data loss, hangs, baselines, CI output, exit "
    "codes, messages, secrets, cost (goal: all as expected)",
}


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.reliability", description=__doc__)
    parser.add_argument("--tables", nargs="+", choices=TABLES, default=list(TABLES))
    parser.add_argument("-k", dest="match", default="", help="only cases whose id contains this")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="small fit settings, as the tests run them (default: dynaudit's)",
    )
    parser.add_argument(
        "--no-seed-comparison",
        dest="compare_seeds",
        action="store_false",
        help="check each alarm and damage case once, as check runs by default (default: also "
        "with --all-seeds, comparing the verdicts and the refits run)",
    )
    parser.add_argument("--workdir", type=Path, help="keep models, baselines and reports here")
    parser.add_argument("--out", type=Path, help="write every outcome as JSON here")
    parser.add_argument(
        "--round2-before",
        type=Path,
        metavar="JSON",
        help="print docs/reliability.md's round-two table: this run's outcomes as 'after', "
        "JSON (an earlier --out, e.g. bench/results/reliability-round2-before.json) as 'before'",
    )
    return parser.parse_args(argv)


def table(name: str, outcomes: list[Outcome]) -> Table:
    failures = sum(not o.ok for o in outcomes)
    out = Table(title=f"{TITLES[name]} · {len(outcomes) - failures}/{len(outcomes)} as expected")
    for column in ("family", "case", "expected", "actual", "", "detail", "s"):
        out.add_column(column, overflow="fold")
    for o in outcomes:
        mark = "[green]✓[/]" if o.ok else "[red]✗[/]"
        if not o.ok and o.known_miss:
            mark, detail = "[yellow]✗ known[/]", f"{o.detail} · known: {o.known_miss}"
        else:
            detail = o.detail
        out.add_row(o.family, o.case, o.expected, o.actual, mark, detail, f"{o.seconds:.0f}")
    return out


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    console = Console(stderr=True)
    root = args.workdir or Path(tempfile.mkdtemp(prefix="dynaudit-reliability-"))
    workspace = Workspace(root, quick=args.quick, compare_seeds=args.compare_seeds)
    # Like the tests (tests/conftest.py): no case sees the user's caches, tokens or servers.
    for name in ("HF_TOKEN", "HF_ENDPOINT", "HF_HUB_OFFLINE", "MLFLOW_TRACKING_URI",
                 "MLFLOW_TRACKING_TOKEN", "GITHUB_ACTIONS", "GITHUB_STEP_SUMMARY"):  # fmt: skip
        os.environ.pop(name, None)
    os.environ["HF_HOME"] = str(root / "hf-home")
    os.environ["DYNAUDIT_CACHE_DIR"] = str(root / "dynaudit-cache")
    selected = [c for c in CASES if c.table in args.tables and args.match in c.id]
    outcomes: list[Outcome] = []
    try:
        for i, case in enumerate(selected, start=1):
            console.print(f"[{i}/{len(selected)}] {case.id}", highlight=False)
            outcomes.append(replace(case.run(workspace), known_miss=case.known(args.quick)))
    finally:
        if args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)
    wide = Console(soft_wrap=False, width=max(140, Console().width))
    for name in args.tables:
        rows = [o for o in outcomes if o.table == name]
        if rows:
            wide.print(table(name, rows))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps([o.as_dict() for o in outcomes], indent=2) + "\n")
    if args.round2_before:
        from bench.reliability.round2 import markdown

        before = json.loads(args.round2_before.read_text())
        print(markdown(before, [o.as_dict() for o in outcomes]))
    seeds = [o.seeds for o in outcomes if o.seeds is not None]
    if seeds:
        from experiments.calibrate_gate import seed_totals

        totals = seed_totals(seeds)
        print(f"sequential seeds: {totals['same_verdicts']}/{totals['checks']} verdicts equal to "
              f"all seeds; {totals['refits_sequential']} warm refits (all seeds: "
              f"{totals['refits_all_seeds']}; every seed of every layer: "
              f"{totals['refits_full']})")  # fmt: skip
    known = [o for o in outcomes if not o.ok and o.known_miss]
    failed = [o for o in outcomes if not o.ok and not o.known_miss]
    print(f"{len(outcomes) - len(known) - len(failed)}/{len(outcomes)} cases as expected, "
          f"{len(known)} known misses (docs/reliability.md), {len(failed)} unexpected")  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
