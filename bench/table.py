"""Markdown table of several ``bench.run`` results: ``python -m bench.table FILE.json ...``.

One column per file, so runs at different sizes, thread counts or revisions sit side by side
(this is how the tables in docs/performance.md are made).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

MIB = 2**20


def _rows(r: dict[str, Any]) -> dict[str, str]:
    dyn, ww, ker, mm, ratio = r["dynaudit"], r["weightwatcher"], r["kernel"], r["mm"], r["ratios"]
    probe = dyn["probe"]
    load = r["machine"]["load_average_start"][0], r["machine"]["load_average_end"][0]
    extrapolated = dyn.get("extrapolated_s")
    return {
        "mode, threads": f"{r['mode']}, {r['threads']}",
        "dynaudit revision": str(r.get("dynaudit_revision", "≈7c1386c (not recorded)")),
        "load average, start → end": f"{load[0]:.1f} → {load[1]:.1f}",
        "dynaudit steps": str(dyn["steps"]),
        "dynaudit measure, s": f"{dyn['wall_s']:.1f}",
        "  of which imports, s": f"{probe['import_s']:.1f}",
        "  CPU user / sys, s": (
            f"{dyn['user_s']:.0f} / {dyn['sys_s']:.0f}" if "user_s" in dyn else "not recorded"
        ),
        "dynaudit at 400 steps (extrapolated), s": f"{extrapolated:.0f}" if extrapolated else "-",
        "WeightWatcher analyze, s": f"{ww['wall_s']:.1f}",
        "  of which import, s": f"{ww['import_s']:.1f}",
        "**time ratio** (goal ≤ 1)": f"**{ratio['time']:.2f}**",
        "**time ratio at 400 steps**": (
            f"**{ratio['time_extrapolated']:.1f}**" if "time_extrapolated" in ratio else "-"
        ),
        "fit kernel, matrix": f"{ker['m']}×{ker['n']}",
        "fit GFLOP/s (best run)": f"{ker['gflops']:.1f}",
        "fit steps/s": f"{ker['steps_per_s']:.1f}",
        "fit s per matrix (400 steps)": f"{ker['seconds_per_matrix']:.0f}",
        "torch.mm 2048² GFLOP/s (best)": f"{mm['gflops']:.1f}",
        "**kernel ratio** (goal ≥ 25 %)": f"**{ratio['kernel']:.1%}**",
        "peak added RssAnon, MiB": f"{probe['rss_anon_added'] / MIB:.0f}",
        "largest matrix f32, MiB": f"{r['largest_matrix_bytes'] / MIB:.2f}",
        "**memory ratio** (goal ≤ 3)": f"**{ratio['memory']:.1f}**",
        "peak total RSS dynaudit / WW, MiB": (
            f"{dyn['max_rss_bytes'] / MIB:.0f} / {ww['max_rss_bytes'] / MIB:.0f}"
        ),
    }


def main(argv: list[str] | None = None) -> int:
    files = [Path(a) for a in (argv if argv is not None else sys.argv[1:])]
    columns = [_rows(json.loads(f.read_text())) for f in files]
    print("| | " + " | ".join(f"`{f.name}`" for f in files) + " |")
    print("|---|" + "---|" * len(files))
    for key in columns[0]:
        print(f"| {key} | " + " | ".join(c[key] for c in columns) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
