"""Bad inputs: every broken checkpoint, source, baseline or interruption a user can meet.

Each case runs the real command line and holds it to the README's exit codes: the documented exit
code, one line on stderr ("dynaudit: error: ..." naming what is wrong, which file or URI, and what
to do), no traceback, and nothing the user had lost or overwritten — the inputs, an existing report
the run was asked to replace, a baseline it read, the directory a baseline was being written to.
Checkpoints are written by hand (raw safetensors headers) or by real producers.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from safetensors.torch import save_file

from bench.reliability.core import FIT, Case, Outcome, Run, Workspace, dynaudit, timed
from tests.cases import BAD_CHECKPOINTS, BROKEN_BASELINES, BadCheckpoint, BrokenBaseline

__all__ = ["CASES"]

TABLE = "inputs"
FAST = ["--q-dim", "16", "--pieces", "4", "--steps", "30"]
# A failure that needs no fit (a bad header, a dead server) must not take longer than this.
PROMPT_SECONDS = 30.0
# Strings that break each output format, in one tensor name (cf. tests/test_check_reports.py).
CRAFTED = "blocks.1.evil\n::error::pwned | `code` <b>&amp; ]]> [x](http://y) %0A\r,:end.weight"


# -- helpers ----------------------------------------------------------------------------


def _fresh(ws: Workspace, *parts: str) -> Path:
    """An empty directory of the workspace (emptied when a kept --workdir already has it)."""
    folder = ws.root.joinpath("inputs", *parts)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


def _hash_tree(paths: Sequence[Path]) -> dict[str, str]:
    """sha256 of every file under ``paths`` (files or directories), by path."""
    found: dict[str, str] = {}
    for root in paths:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for file in files:
            found[str(file)] = hashlib.sha256(file.read_bytes()).hexdigest()
        if root.is_dir():
            found.update({f"{d}/": "dir" for d in root.rglob("*") if d.is_dir()})
    return found


@dataclass(frozen=True)
class Guard:
    """What the user had before a run: every file under ``paths``, to prove it untouched."""

    paths: tuple[Path, ...]
    before: dict[str, str]

    @classmethod
    def of(cls, *paths: Path) -> Guard:
        return cls(paths, _hash_tree(paths))

    def changed(self) -> list[str]:
        after = _hash_tree(self.paths)
        keys = self.before.keys() | after.keys()
        return sorted(k for k in keys if self.before.get(k) != after.get(k))


def _reports(folder: Path) -> tuple[list[str], Path, Path]:
    """``--json`` and ``--markdown`` flags naming reports of an earlier run, which a failed run
    must leave as they were."""
    json_path, md_path = folder / "earlier.json", folder / "earlier.md"
    json_path.write_text('{"an": "earlier report"}\n')
    md_path.write_text("# an earlier report\n")
    return ["--json", str(json_path), "--markdown", str(md_path)], json_path, md_path


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def _trim(text: str, limit: int = 400) -> str:
    text = text.strip()
    return text if len(text) <= limit else text[: limit - 1] + "…"


def judge(
    name: str,
    family: str,
    run: Run,
    code: int,
    needles: Sequence[str],
    *,
    guard: Guard | None = None,
    problems: Sequence[str] = (),
    seconds: float = 0.0,
    prompt: bool = True,
) -> Outcome:
    """The row for a run that must fail with exit ``code`` and one line containing every one of
    ``needles`` (case-insensitive), leaving what ``guard`` watches untouched."""
    found = list(problems)
    lines = _lines(run.stderr)
    line = lines[-1].strip() if lines else ""
    if len(lines) != 1:
        found.append(f"{len(lines)} lines on stderr")
    if run.traceback:
        found.append("traceback")
    prefix = "dynaudit: interrupted" if code == 130 else "dynaudit: error:"
    if not line.startswith(prefix):
        found.append(f"the line does not start with {prefix!r}")
    missing = [n for n in needles if n.lower() not in line.lower()]
    if missing:
        found.append("the message lacks " + ", ".join(map(repr, missing)))
    if guard is not None and (changed := guard.changed()):
        found.append(f"changed: {', '.join(changed[:3])}")
    if prompt and seconds > PROMPT_SECONDS:
        found.append(f"took {seconds:.0f} s")
    ok = run.code == code and not found
    detail = _trim(line if len(lines) <= 1 else " ⏎ ".join(lines[-3:]))
    if found:
        detail += " · " + "; ".join(found)
    return Outcome(TABLE, name, family, f"exit {code}", f"exit {run.code}", ok, detail, seconds)


def _measure_bad(ws: Workspace, *, case: BadCheckpoint) -> Outcome:
    """``measure`` the case's checkpoint, asked to replace two earlier reports."""
    with timed() as elapsed:
        folder = _fresh(ws, re.sub(r"\W+", "-", case.name).strip("-"))
        (folder / "ckpt").mkdir()
        (folder / "out").mkdir()
        source = case.make(folder / "ckpt")
        flags, *_ = _reports(folder / "out")
        guard = Guard.of(folder)
        run = dynaudit("measure", source, *flags, *FAST)
    wanted = case.expected(source)
    return judge(case.name, "generic", run, case.code, wanted, guard=guard, seconds=elapsed())


def _matrix(folder: Path, name: str = "model.safetensors") -> Path:
    path = folder / name
    save_file({"fc1.weight": torch.randn(64, 32), "fc2.weight": torch.randn(16, 64)}, str(path))
    return path


class _Evil:
    """Unpickling this runs ``touch <canary>``: what a loader must never do."""

    def __init__(self, canary: Path) -> None:
        self.canary = canary

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.canary}",))


def _malicious(ws: Workspace, *, raw: bool) -> Outcome:
    """A pickle whose loading would create a canary file, read with --allow-pickle: refused by
    torch.load(weights_only=True), exit 3, the canary never created."""
    name = "malicious pickle --allow-pickle" + (
        " (raw pickle .bin)" if raw else " (torch.save .pt)"
    )
    with timed() as elapsed:
        folder = _fresh(ws, "malicious-raw" if raw else "malicious-pt")
        canary = folder.parent / f"canary-{folder.name}"
        canary.unlink(missing_ok=True)
        if raw:
            source = folder / "pytorch_model.bin"
            source.write_bytes(pickle.dumps({"fc.weight": _Evil(canary)}))
            target = folder  # the directory: found as its only weights
        else:
            source = folder / "model.pt"
            torch.save({"fc.weight": _Evil(canary)}, source)
            target = source
        flags, *_ = _reports(folder)
        guard = Guard.of(folder)
        cache = folder.parent / f"cache-{folder.name}"
        run = dynaudit("measure", target, "--allow-pickle", "--cache-dir", cache, *flags, *FAST)
        problems = [f"CODE RAN: {canary.name} exists"] if canary.exists() else []
        # The hash memo may remember the file's sha256; nothing converted or staged may stay.
        leftovers = [p for p in (*cache.glob("pickles/*"), *cache.rglob(".tmp-*"))]
        if leftovers:
            problems.append(f"left in the cache: {leftovers[0].relative_to(cache)}")
    return judge(name, "generic", run, 3, [source.name, "weights_only"], guard=guard,
                 problems=problems, seconds=elapsed())  # fmt: skip


# -- servers ----------------------------------------------------------------------------


def _wrong_repo(ws: Workspace) -> Outcome:
    from tests.hubserver import LocalHub

    with timed() as elapsed:
        folder = _fresh(ws, "hub-wrong-repo")
        storage = folder / "storage"
        storage.mkdir()
        published = folder / "published"
        published.mkdir()
        _matrix(published)
        flags, *_ = _reports(folder)
        hub = LocalHub(storage).start()
        try:
            hub.add("org/real-model", published)
            guard = Guard.of(folder / "earlier.json", folder / "earlier.md")
            run = dynaudit(
                "measure", "hf://org/no-such-model", "--hf-endpoint", hub.url, *flags, *FAST,
                env={"HF_HOME": str(folder / "hf-home")},
            )  # fmt: skip
        finally:
            hub.stop()
    return judge("wrong Hub repo id", "generic", run, 3, ["org/no-such-model", "HF_TOKEN"],
                 guard=guard, seconds=elapsed())  # fmt: skip


def _unreachable(ws: Workspace, *, kind: str) -> Outcome:
    """A server on a closed port (9, discard): a prompt exit 3 saying what to check."""
    with timed() as elapsed:
        folder = _fresh(ws, f"unreachable-{kind}")
        flags, *_ = _reports(folder)
        guard = Guard.of(folder)
        if kind == "hf":
            args = ["hf://org/model", "--hf-endpoint", "http://127.0.0.1:9"]
            needles = ["hf://org/model", "cannot reach", "127.0.0.1:9", "--hf-endpoint"]
        else:
            args = ["models:/model/1", "--mlflow-uri", "http://127.0.0.1:9"]
            needles = ["models:/model/1", "cannot reach", "127.0.0.1:9", "--mlflow-uri"]
        run = dynaudit("measure", *args, *flags, *FAST, env={"HF_HOME": str(folder / "hf-home")})
    name = "unreachable Hub endpoint" if kind == "hf" else "unreachable MLflow server"
    return judge(name, "generic", run, 3, needles, guard=guard, seconds=elapsed())


# -- baselines --------------------------------------------------------------------------


def _other_architecture(ws: Workspace) -> Outcome:
    """A ViT checked against a LLaMA baseline: exit 3 naming the mismatch; the baseline and an
    earlier report untouched."""
    baseline = ws.baseline("llama")
    with timed() as elapsed:
        folder = _fresh(ws, "other-architecture")
        flags, *_ = _reports(folder)
        source = ws.base("vit")
        guard = Guard.of(baseline, source, folder)
        run = dynaudit("check", source, "--baseline", baseline, "--no-cache", *flags,
                       "--junit", folder / "junit.xml", *FIT)  # fmt: skip
        problems = ["wrote junit.xml"] if (folder / "junit.xml").exists() else []
    return judge("ViT against a LLaMA baseline", "vit", run, 3, ["baseline"],
                 guard=guard, problems=problems, seconds=elapsed())  # fmt: skip


def _bad_baseline(ws: Workspace, *, case: BrokenBaseline, family: str) -> Outcome:
    """A copy of the family's baseline, damaged by the case; the base checked against it."""
    with timed() as elapsed:
        folder = _fresh(ws, re.sub(r"\W+", "-", case.name).strip("-"))
        copy = shutil.copytree(ws.baseline(family), folder / "baseline")
        file = case.damage(copy)
        flags, *_ = _reports(folder)
        guard = Guard.of(folder)
        run = dynaudit("check", ws.base(family), "--baseline", copy, "--no-cache", *flags, *FIT)
    wanted = [file, *case.needles]
    return judge(case.name, family, run, 3, wanted, guard=guard, seconds=elapsed())


def _existing_out(ws: Workspace, *, kind: str) -> Outcome:
    """``baseline --out`` naming an existing baseline (or a file): refused before any work,
    exit 2, the existing one byte for byte as it was."""
    with timed() as elapsed:
        folder = _fresh(ws, f"existing-out-{kind}")
        if kind == "baseline":
            out = shutil.copytree(ws.baseline("cnn"), folder / "baseline")
        else:
            out = folder / "notes.txt"
            out.write_text("the user's notes\n")
        guard = Guard.of(folder)
        run = dynaudit("baseline", ws.base("cnn"), "--out", out, *FIT)
    name = f"baseline --out an existing {'baseline' if kind == 'baseline' else 'file'}"
    return judge(name, "cnn", run, 2, [str(out), "already exists", "--out"], guard=guard,
                 seconds=elapsed())  # fmt: skip


# -- concurrency and interruption -------------------------------------------------------


def _child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment :func:`~bench.reliability.core.dynaudit` gives, plus ``extra``."""
    env = {**os.environ, "CI": "true", "OMP_NUM_THREADS": "1"}
    for name in ("DYNAUDIT_DEBUG", "GITHUB_ACTIONS"):
        env.pop(name, None)
    return {**env, **(extra or {})}


def _concurrent_cache(ws: Workspace) -> Outcome:
    """Two `measure` of the same checkpoint at once, sharing a fresh cache: both succeed with
    the same numbers, and the cache holds one whole, loadable entry and no temporary files."""
    from dynaudit.schema import Report
    from tests.conftest import figures

    with timed() as elapsed:
        folder = _fresh(ws, "concurrent-cache")
        cache = folder / "cache"
        source = ws.base("cnn")
        command = [sys.executable, "-m", "dynaudit", "measure", str(source), *FAST,
                   "--cache-dir", str(cache), "--quiet"]  # fmt: skip
        procs = [
            subprocess.Popen(
                [*command, "--json", str(folder / f"{i}.json")],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=_child_env(),
            )
            for i in range(2)
        ]
        outputs = [proc.communicate(timeout=900) for proc in procs]
        codes = [proc.returncode for proc in procs]
        problems = [f"run {i}: {_trim(err, 200)}" for i, (_, err) in enumerate(outputs) if err]
        reports = [folder / f"{i}.json" for i in range(2)]
        if codes == [0, 0] and all(p.exists() for p in reports):
            a, b = (Report.model_validate_json(p.read_text()) for p in reports)
            if figures(a) != figures(b):
                problems.append("the two runs' numbers differ")
            hits = [r.cache.hit if r.cache else None for r in (a, b)]
        else:
            hits = []
        entries = list(cache.glob("results/*/*/report.json"))
        if len(entries) != 1:
            problems.append(f"{len(entries)} cache entries")
        for entry in entries:
            try:
                Report.model_validate_json(entry.read_text())
            except ValueError as exc:
                problems.append(f"unloadable entry {entry.parent.name[:12]}: {exc}")
        debris = [p.name for p in cache.rglob(".tmp-*")] + [p.name for p in cache.rglob(".trash-*")]
        if debris:
            problems.append(f"left behind: {debris[0]}")
        again = dynaudit("measure", source, *FAST, "--cache-dir", cache, "--quiet",
                         "--json", folder / "again.json")  # fmt: skip
        third = (
            Report.model_validate_json((folder / "again.json").read_text())
            if again.code == 0
            else None
        )
        if third is None or third.cache is None or not third.cache.hit:
            problems.append("a third run did not hit the stored entry")
    actual = " ".join(f"exit {c}" for c in codes)
    ok = codes == [0, 0] and not problems
    detail = f"cache hits {hits}, {len(entries)} entry, reused by a third run"
    if problems:
        detail = "; ".join(problems)
    return Outcome(TABLE, "two processes writing the cache at once", "cnn", "exit 0 exit 0",
                   actual, ok, detail, elapsed())  # fmt: skip


def _interrupted_baseline(ws: Workspace, *, family: str, sig: int = signal.SIGINT) -> Outcome:
    """SIGINT while `baseline --out DIR` fits: exit 130, DIR never created, no staging
    directory left beside it, nothing else in the parent touched."""
    source = ws.base(family)
    with timed() as elapsed:
        folder = _fresh(ws, f"interrupted-{family}-{signal.Signals(sig).name}")
        (folder / "keep.txt").write_text("the user's file\n")
        out = folder / "baseline"
        guard = Guard.of(folder)
        argv = [sys.executable, "-m", "dynaudit", "baseline", str(source), "--out", str(out), *FIT]
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=_child_env())  # fmt: skip
        problems: list[str] = []
        deadline = time.monotonic() + 120
        staged: list[Path] = []
        while time.monotonic() < deadline and proc.poll() is None:
            staged = list(folder.glob(f".{out.name}.tmp-*/coords/*.safetensors"))
            if staged:  # fitting: at least one layer's coordinates written
                break
            time.sleep(0.1)
        if not staged:
            problems.append("never saw the staging directory fill (finished or too slow?)")
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=120)
        left = [p.name for p in folder.iterdir() if p.name != "keep.txt"]
        if out.exists():
            problems.append(f"{out.name} exists")
        if left:
            problems.append(f"left behind: {', '.join(left)}")
    run = Run(argv, proc.returncode, stdout, stderr)
    name = f"{signal.Signals(sig).name} during baseline --out"
    return judge(name, family, run, 130, ["interrupted"], guard=guard, problems=problems,
                 seconds=elapsed(), prompt=False)  # fmt: skip


# -- strings from checkpoints in CI output ----------------------------------------------


def _crafted_checkpoint(folder: Path, *, zero: bool = False, nan: bool = False) -> Path:
    """Three Linear layers, the middle one named :data:`CRAFTED` (zeroed or NaN-poisoned)."""
    gen = torch.Generator().manual_seed(0)
    middle = torch.randn(32, 32, generator=gen) * 0.1
    if zero:
        middle = torch.zeros_like(middle)
    if nan:
        middle[3, 4] = float("nan")
    tensors = {
        "blocks.0.fc.weight": torch.randn(32, 16, generator=gen) * 0.1,
        CRAFTED: middle,
        "blocks.2.fc.weight": torch.randn(16, 32, generator=gen) * 0.1,
    }
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "model.safetensors"))
    return folder


_ANNOTATION = re.compile(r"^::error title=[^\n:]*::[^\n]*$")


def _workflow_commands(text: str, where: str) -> list[str]:
    """Problems with the lines GitHub would read as workflow commands: only dynaudit's own
    well-formed ``::error`` lines, the crafted name inside them escaped."""
    problems = []
    for line in text.splitlines():
        stripped = line.lstrip()
        if not stripped.startswith("::"):
            continue
        if not _ANNOTATION.match(line) or "::error::pwned" in line.replace("%0A::error::", ""):
            problems.append(f"{where} injects a command: {_trim(line, 80)!r}")
    return problems


def _pipes(row: str) -> int:
    return len(re.findall(r"(?<!\\)\|", row))


def _markdown_rows(text: str, where: str, layers: int) -> list[str]:
    """The Layers table has one row per layer, each with as many cells as its header."""
    problems = []
    section = text.split("## Layers", 1)[-1] if "## Layers" in text else ""
    table: list[str] = []
    for line in section.splitlines()[1:]:
        if table and not line.startswith("|"):
            break
        if line.startswith("|"):
            table.append(line)
    header, rows = (table[0], table[2:]) if len(table) >= 2 else ("", [])
    if len(rows) != layers:
        problems.append(f"{where}: {len(rows)} layer rows for {layers} layers")
    for row in rows:
        if _pipes(row) != _pipes(header):
            problems.append(f"{where}: a row with {_pipes(row)} cell borders, not {_pipes(header)}")
    if "<b>" in _outside_code(text) or "\n::error::pwned" in text:
        problems.append(f"{where}: markup or a command survived")
    return problems


def _outside_code(text: str) -> str:
    """Markdown ``text`` without its code spans, where ``<b>`` is shown as it is, not markup
    (a span fenced by a run of backticks ends at the next run of the same length)."""
    return re.sub(r"(`+)(?:.*?[^`])?\1(?!`)", "", text)


def _crafted_names(ws: Workspace) -> Outcome:
    """A zeroed layer whose name carries a newline + ``::error::``, pipes, backticks, HTML and
    ``]]>``, checked inside GitHub Actions with --markdown and --junit: exit 1, every format
    intact, every annotation one escaped line, earlier summary and output lines kept."""
    with timed() as elapsed:
        folder = _fresh(ws, "crafted-names")
        clean = _crafted_checkpoint(folder / "clean")
        damaged = _crafted_checkpoint(folder / "damaged", zero=True)
        baseline = folder / "baseline"
        made = dynaudit("baseline", clean, "--out", baseline, "--seeds", "2", *FAST, *FIT)
        if made.code != 0:
            return judge("crafted tensor name in CI output", "generic", made, 0, [])
        summary, output = folder / "summary.md", folder / "output.txt"
        summary.write_text("earlier step\n")
        output.write_text("earlier=1\n")
        md, junit, report = folder / "check.md", folder / "check.xml", folder / "check.json"
        argv = [sys.executable, "-m", "dynaudit", "check", str(damaged), "--baseline",
                str(baseline), "--markdown", str(md), "--junit", str(junit), "--json", str(report),
                *FIT]  # fmt: skip
        env = _child_env({"GITHUB_ACTIONS": "true", "GITHUB_STEP_SUMMARY": str(summary),
                          "GITHUB_OUTPUT": str(output)})  # fmt: skip
        proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=900,
                              check=False)  # fmt: skip
        problems: list[str] = []
        problems += _workflow_commands(proc.stdout, "stdout")
        problems += _workflow_commands(proc.stderr, "stderr")
        annotations = [line for line in proc.stdout.splitlines() if line.startswith("::error")]
        if not any("pwned" in a for a in annotations):
            problems.append("no annotation names the damaged layer")
        for where, path in (("--markdown", md), ("step summary", summary)):
            text = path.read_text() if path.exists() else ""
            problems += _markdown_rows(text, where, 3)
            problems += _workflow_commands(text, where)
        if not summary.read_text().startswith("earlier step\n# dynaudit check"):
            problems.append("the step summary lost the earlier step's text")
        if output.read_text() != "earlier=1\nverdict=fail\n":
            problems.append(f"GITHUB_OUTPUT is {output.read_text()!r}")
        try:
            root = ET.fromstring(junit.read_text())
            failures = [f.get("message", "") for f in root.iter("failure")]
            if not any("pwned" in f for f in failures):
                problems.append("no JUnit failure names the damaged layer")
        except (OSError, ET.ParseError) as exc:
            problems.append(f"JUnit XML does not parse: {exc}")
    ok = proc.returncode == 1 and not problems
    detail = "; ".join(problems) or (
        f"{len(annotations)} escaped annotation(s), JUnit parses, 3 Markdown rows"
    )
    return Outcome(TABLE, "crafted tensor name in CI output", "generic", "exit 1",
                   f"exit {proc.returncode}", ok, detail, elapsed())  # fmt: skip


def _crafted_nan(ws: Workspace) -> Outcome:
    """NaN in the layer with the crafted name: exit 1, one line naming it, no command."""
    with timed() as elapsed:
        folder = _fresh(ws, "crafted-nan")
        source = _crafted_checkpoint(folder / "ckpt", nan=True)
        md = folder / "r.md"
        run = dynaudit("measure", source, "--markdown", md, *FAST)
        problems = _workflow_commands(run.stdout, "stdout") + _workflow_commands(
            run.stderr, "stderr"
        )
        problems += _markdown_rows(md.read_text(), "--markdown", 3) if md.exists() else []
    return judge("NaN in a layer with a crafted name", "generic", run, 1,
                 ["non-finite", "pwned"], problems=problems, seconds=elapsed())  # fmt: skip


def _odd_names(ws: Workspace) -> Outcome:
    """Valid but unusual tensor names — empty, a superscript between digits, a path
    traversal, 5000 characters — through measure, baseline and check with every report:
    exit 0, every layer measured, the baseline's files only inside its directory."""
    with timed() as elapsed:
        folder = _fresh(ws, "odd-names")
        gen = torch.Generator().manual_seed(0)
        names = ["fc.1¹0.weight", "../../outside.weight", "", "x" * 5000]
        shapes = [(16, 8), (16, 16), (8, 16), (8, 8)]
        (folder / "ckpt").mkdir()
        tensors = {n: torch.randn(*s, generator=gen) * 0.1
                   for n, s in zip(names, shapes, strict=True)}  # fmt: skip
        save_file(tensors, str(folder / "ckpt" / "model.safetensors"))
        runs = [
            dynaudit("measure", folder / "ckpt", "--json", folder / "m.json", "--markdown",
                     folder / "m.md", *FAST),
            dynaudit("baseline", folder / "ckpt", "--out", folder / "out" / "baseline",
                     "--seeds", "2", *FAST, *FIT),
            dynaudit("check", folder / "ckpt", "--baseline", folder / "out" / "baseline",
                     "--json", folder / "c.json", "--markdown", folder / "c.md", "--junit",
                     folder / "c.xml", *FIT),
        ]  # fmt: skip
        problems = [f"{r.argv[3]}: exit {r.code}: {_trim(r.message, 160)}" for r in runs if r.code]
        if not problems:
            measured = json.loads((folder / "m.json").read_text())["layers"]
            if sorted(layer["name"] for layer in measured if "skipped" not in layer) != sorted(
                names
            ):
                problems.append("not every layer measured")
            strays = [p.name for p in folder.rglob("*outside*")]
            strays += [p.name for p in (folder / "out").iterdir() if p.name != "baseline"]
            if strays:
                problems.append(f"written outside: {strays}")
            problems += _markdown_rows((folder / "m.md").read_text(), "measure --markdown", 4)
            problems += _markdown_rows((folder / "c.md").read_text(), "check --markdown", 4)
            ET.fromstring((folder / "c.xml").read_text())
    codes = " ".join(f"exit {r.code}" for r in runs)
    ok = not problems
    detail = "; ".join(problems) or "4 layers measured, baseline and check pass, reports intact"
    return Outcome(TABLE, "odd but valid tensor names", "generic", "exit 0 exit 0 exit 0", codes,
                   ok, detail, elapsed())  # fmt: skip


# -- the table --------------------------------------------------------------------------


def _cases() -> list[Case]:
    cases = [
        Case(TABLE, case.name, "generic", partial(_measure_bad, case=case))
        for case in BAD_CHECKPOINTS
    ]
    cases += [
        Case(TABLE, "malicious pickle raw", "generic", partial(_malicious, raw=True)),
        Case(TABLE, "malicious pickle pt", "generic", partial(_malicious, raw=False)),
        Case(TABLE, "wrong Hub repo id", "generic", _wrong_repo),
        Case(TABLE, "unreachable Hub", "generic", partial(_unreachable, kind="hf")),
        Case(TABLE, "unreachable MLflow", "generic", partial(_unreachable, kind="mlflow")),
        Case(TABLE, "other architecture", "vit", _other_architecture),
    ]
    cases += [
        Case(TABLE, case.name, "cnn", partial(_bad_baseline, case=case, family="cnn"))
        for case in BROKEN_BASELINES
    ]
    cases += [
        Case(TABLE, "existing --out baseline", "cnn", partial(_existing_out, kind="baseline")),
        Case(TABLE, "existing --out file", "cnn", partial(_existing_out, kind="file")),
        Case(TABLE, "concurrent cache writers", "cnn", _concurrent_cache),
        Case(TABLE, "SIGINT during baseline", "llama",
             partial(_interrupted_baseline, family="llama")),
        # CI runners cancel with SIGTERM too (GitHub Actions: SIGINT, then SIGTERM; docker
        # stop, Kubernetes, timeout(1)): the same promise, nothing half-written left.
        Case(TABLE, "SIGTERM during baseline", "cnn",
             partial(_interrupted_baseline, family="cnn", sig=signal.SIGTERM)),
        Case(TABLE, "crafted tensor name", "generic", _crafted_names),
        Case(TABLE, "crafted name with NaN", "generic", _crafted_nan),
        Case(TABLE, "odd names", "generic", _odd_names),
    ]  # fmt: skip
    return cases


CASES = _cases()
