"""Round two (issue 18): every failure the second attack on the CLI found, one case each.

The expected outcome of every case was written here before the fixes landed, from the issue's
text (its "Build" and "Acceptance" sections); docs/reliability.md records which cases failed
before. The groups follow the issue's list:

1. **false pass**: a directory holding both ``model.safetensors`` (damaged) and a healthy
   sharded index: transformers loads ``model.safetensors``, so the gate must not pass;
2. **data loss**: an output path that is one of the inputs is exit 2, every file unchanged;
3. **hang**: a FIFO or a device where weights are expected is exit 3 at once, not a hang;
4. **baseline**: a baseline is a closed world: unlisted, outside, misshapen, non-finite or
   extra coordinate files are exit 3 "tampered or corrupt";
5. **CI output**: crafted tensor names leave no ESC or BEL byte anywhere, and JUnit parses;
6. **exit code**: unwritable outputs and crafted inputs are exit 3 (2 for a path that cannot
   be an output), never 4; a failing side channel keeps the verdict's code;
7. **message**: adapter cycles, policy keys and flag origins are named;
8. **secrets**: a server that echoes ``Authorization`` does not get the token printed;
9. **cost**: measure is not quadratic in the number of layers; stale staging is swept.

Every run is a real ``python -m dynaudit`` child process with a timeout, so a hang is a
failed case, not a hung suite. Exit codes and message needles follow the issue; the needles
are loose on purpose (a file name, "tampered or corrupt"), not the fixers' wording.
"""

from __future__ import annotations

import base64
import json
import os
import re
import resource
import shutil
import stat
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from dataclasses import replace
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote

import torch
from safetensors.torch import load_file, save_file

from bench.reliability.core import FIT, Case, Outcome, Run, Workspace, delegated, timed
from bench.reliability.inputs import (
    FAST,
    Guard,
    _fresh,
    judge,
)
from tests.cases import rehash_manifest
from tests.producers import raw_safetensors

__all__ = ["CASES", "TABLE"]

TABLE = "round2"
# A run that should answer at once is killed after this long: a hang fails its case.
HANG_SECONDS = 30.0
# Beyond a plain input error's own start-up time, a FIFO or device case may take this long.
FIFO_SECONDS = 2.0
# Every byte that lets a crafted name drive a terminal: none may reach any output.
CONTROL = ("\x1b", "\x07")
# A layer name (and so a layer type, its last component) with ANSI erase-line + carriage
# return + "PASS", BEL, a BiDi override, a form feed and U+FFFF (neither allowed in XML), markup
# and a newline that would start a workflow command.
CRAFTED = "blocks.1.x\x1b[2K\rPASS\x07\u202eevil\x0c\uffff<b>&\n::error::pwned.weight"
# The same bytes in the places a checkpoint's author controls besides tensor names.
CRAFTED_DIR = "ckpt\x1b[31mRED\x07"
CRAFTED_CONFIG = {"model_type": "x\x1b]0;title\x07y", "architectures": ["Evil\x1b[2KArch\x07"]}


# -- running ----------------------------------------------------------------------------


def _cli(
    *args: str | Path | int,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float | None = None,
    max_file_bytes: int | None = None,
) -> Run:
    """``python -m dynaudit ARGS`` (CI=true, one thread, no GitHub variables unless ``env``
    sets them); with a ``timeout`` (a case about a hang) killed after that long, which reads
    as exit 124 and a "hung" line. ``max_file_bytes``: RLIMIT_FSIZE of the child, a full disk
    for every file it writes (a write past it fails with EFBIG; Python ignores SIGXFSZ).
    Without either, a launcher (:func:`~bench.reliability.core.launched_by`) may run it."""
    argv = [sys.executable, "-m", "dynaudit", *map(str, args)]
    changes: dict[str, str | None] = {"CI": "true", "OMP_NUM_THREADS": "1"}
    changes |= {"DYNAUDIT_DEBUG": None, "GITHUB_ACTIONS": None, **(env or {})}
    if env is None or "GITHUB_STEP_SUMMARY" not in env:
        changes |= {"GITHUB_STEP_SUMMARY": None, "GITHUB_OUTPUT": None}
    can_delegate = timeout is None and max_file_bytes is None
    if can_delegate and (run := delegated(argv, changes, cwd)) is not None:
        return run
    return _child(argv, changes, cwd, timeout or 600, max_file_bytes)


def _child(
    argv: list[str],
    changes: dict[str, str | None],
    cwd: Path | None,
    timeout: float,
    max_file_bytes: int | None,
) -> Run:
    """The command as a child process (what :func:`_cli` does without a launcher)."""

    def limit() -> None:
        if max_file_bytes is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_bytes, max_file_bytes))

    child = {k: v for k, v in {**os.environ, **changes}.items() if v is not None}
    try:
        proc = subprocess.run(
            argv,
            env=child,
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            preexec_fn=limit,
        )
    except subprocess.TimeoutExpired:
        return Run(argv, 124, "", f"(hung: killed after {timeout:.0f} s)")
    return Run(argv, proc.returncode, proc.stdout, proc.stderr)


def _judge(
    name: str,
    family: str,
    run: Run,
    codes: int | Sequence[int],
    needles: Sequence[str] = (),
    **kw: object,
) -> Outcome:
    """:func:`bench.reliability.inputs.judge` for this table; ``codes`` may allow several
    exit codes (the first is the one the issue names)."""
    allowed = (codes,) if isinstance(codes, int) else tuple(codes)
    code = run.code if run.code in allowed else allowed[0]
    outcome = judge(name, family, run, code, needles, **kw)  # type: ignore[arg-type]
    expected = " or ".join(f"exit {c}" for c in allowed)
    return replace(outcome, table=TABLE, expected=expected)


def _row(
    name: str, family: str, expected: str, actual: str, problems: list[str], seconds: float,
    detail: str = "",
) -> Outcome:  # fmt: skip
    return Outcome(TABLE, name, family, expected, actual, not problems,
                   "; ".join(problems) or detail, seconds)  # fmt: skip


def _problems(run: Run, codes: Sequence[int]) -> list[str]:
    found = [] if run.code in codes else [f"exit {run.code}: {run.message[:200]}"]
    if run.traceback:
        found.append("traceback")
    return found


# -- small checkpoints ------------------------------------------------------------------


def _tiny(folder: Path, scale: float = 0.1) -> Path:
    """Three Linear layers (two of one shape, so swapping their coordinates fits), a config."""
    gen = torch.Generator().manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(
        {"fc1.weight": torch.randn(32, 32, generator=gen) * scale,
         "fc2.weight": torch.randn(32, 32, generator=gen) * scale,
         "fc3.weight": torch.randn(16, 32, generator=gen) * scale},
        str(folder / "model.safetensors"), metadata={"format": "pt"},
    )  # fmt: skip
    (folder / "config.json").write_text(json.dumps({"model_type": "mlp"}) + "\n")
    return folder


def _baseline_of(ws: Workspace, key: str, build: Callable[[Path], Path]) -> Path:
    """A baseline (2 seeds, the tests' small fit) of the checkpoint ``build(folder)`` writes,
    built once per workspace under ``key``."""

    def make(out: Path) -> Path:
        source = build(out.parent / (out.name + "-source"))
        run = _cli("baseline", source, "--out", out, "--seeds", "2", *FAST, *FIT)
        if run.code != 0:
            raise RuntimeError(f"the {key} baseline failed: {run.stderr[-2000:]}")
        return out

    return ws.once(f"round2/{key}", make)


def _tiny_baseline(ws: Workspace) -> Path:
    """A baseline of :func:`_tiny`, built once."""
    return _baseline_of(ws, "tiny-baseline", _tiny)


def _tiny_reports(ws: Workspace) -> Path:
    """A folder with two measure reports of :func:`_tiny` (seeds 0 and 1), built once."""

    def make(out: Path) -> Path:
        source = _tiny(out / "ckpt")
        for seed in (0, 1):
            run = _cli("measure", source, "--seed", seed, "--json", out / f"{'ab'[seed]}.json",
                       "--quiet", "--no-cache", *FAST, *FIT)  # fmt: skip
            if run.code != 0:
                raise RuntimeError(f"measuring the tiny model failed: {run.stderr[-2000:]}")
        return out

    return ws.once("round2/tiny-reports", make)


def _crafted(folder: Path, *, zero: bool = False) -> Path:
    """Three Linear layers, the middle one named :data:`CRAFTED` (all zeros when ``zero``), and
    a config.json with :data:`CRAFTED_CONFIG`."""
    gen = torch.Generator().manual_seed(0)
    middle = torch.randn(32, 32, generator=gen) * 0.1
    folder.mkdir(parents=True, exist_ok=True)
    save_file(
        {"blocks.0.fc.weight": torch.randn(32, 16, generator=gen) * 0.1,
         CRAFTED: torch.zeros_like(middle) if zero else middle,
         "blocks.2.fc.weight": torch.randn(16, 32, generator=gen) * 0.1},
        str(folder / "model.safetensors"),
    )  # fmt: skip
    (folder / "config.json").write_text(json.dumps(CRAFTED_CONFIG))
    return folder


def _slug(name: str) -> str:
    return re.sub(r"[^0-9a-zA-Z_]+", "-", name).strip("-")[:60]


# -- 1. false pass: the file the loader reads ---------------------------------------------

_Q = "model.layers.0.self_attn.q_proj.weight"
_DOWN = "model.layers.1.mlp.down_proj.weight"


def _ambiguous(ws: Workspace, folder: Path) -> Path:
    """The LLaMA base's healthy shards and index, plus a ``model.safetensors`` holding every
    tensor with a NaN in one ``q_proj`` and an all-zero ``down_proj`` (what transformers
    loads: it looks for ``model.safetensors`` before the index)."""
    from experiments.derived import load_state

    base = ws.base("llama")
    out = shutil.copytree(base, folder / "ambiguous")
    state = load_state(base)
    state[_Q] = state[_Q].clone()
    state[_Q][0, 0] = float("nan")
    state[_DOWN] = torch.zeros_like(state[_DOWN])
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})  # fmt: skip
    return out


def _false_pass(ws: Workspace, *, command: str) -> Outcome:
    family = "1 false pass"
    codes: tuple[int, ...]
    with timed() as elapsed:
        folder = _fresh(ws, "round2", f"ambiguous-{command}")
        source = _ambiguous(ws, folder)
        guard = Guard.of(source)
        if command == "measure":
            run = _cli("measure", source, "--no-cache", *FAST, *FIT)
            name, codes = "measure: damaged model.safetensors beside healthy shards", (1,)
        elif command == "check":
            run = _cli("check", source, "--baseline", ws.baseline("llama"), "--no-cache", *FIT)
            name, codes = "check: damaged model.safetensors beside healthy shards", (1, 3)
        else:
            from tests.hubserver import LocalHub

            (folder / "storage").mkdir()
            hub = LocalHub(folder / "storage").start()
            try:
                hub.add("org/ambiguous", source)
                run = _cli("check", "hf://org/ambiguous", "--baseline", ws.baseline("llama"),
                           "--hf-endpoint", hub.url, "--no-cache", *FIT,
                           env={"HF_HOME": str(folder / "hf-home")})  # fmt: skip
            finally:
                hub.stop()
            name, codes = "check: the same repository on the Hub (local endpoint)", (1, 3)
        problems = _problems(run, codes)
        if run.code == 1 and command == "measure" and _Q not in run.stdout + run.stderr:
            problems.append(f"{_Q} (the NaN) not named")
        if changed := guard.changed():
            problems.append(f"changed: {changed[0]}")
    expected = " or ".join(f"exit {c}" for c in codes) + (" (not a pass)" if 3 in codes else "")
    return _row(name, family, expected, f"exit {run.code}", problems, elapsed(),
                _first_line(run))  # fmt: skip


def _first_line(run: Run) -> str:
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    return lines[-1][:240] if lines else ""


# -- 2. data loss: outputs never touch inputs ---------------------------------------------


def _data_loss(ws: Workspace, *, kind: str) -> Outcome:
    family = "2 data loss"
    with timed() as elapsed:
        folder = _fresh(ws, "round2", f"loss-{kind}")
        if kind == "checkpoint":
            source = _tiny(folder / "X")
            guard = Guard.of(folder)
            run = _cli("measure", source, "--json", source / "model.safetensors", *FAST, *FIT)
            name, needles = "measure X --json X/model.safetensors", ["model.safetensors"]
        elif kind == "baseline":
            baseline = shutil.copytree(_tiny_baseline(ws), folder / "BL")
            source = _tiny(folder / "M")
            guard = Guard.of(folder)
            run = _cli("check", source, "--baseline", baseline, "--json",
                       baseline / "baseline.json", *FIT)  # fmt: skip
            name, needles = "check M --baseline BL --json BL/baseline.json", ["baseline.json"]
        elif kind == "plot":
            reports = _tiny_reports(ws)
            a, b = (shutil.copy(reports / n, folder / n) for n in ("a.json", "b.json"))
            guard = Guard.of(folder)
            run = _cli("plot", a, b, "--out", a)
            name, needles = "plot a.json b.json --out a.json", ["a.json"]
        elif kind == "demo":
            source = _tiny(folder / "mine")
            guard = Guard.of(folder)
            run = _cli("demo", "--out", source)
            name, needles = "demo --out <an existing checkpoint directory>", [source.name]
        else:  # two outputs to one path
            source = _tiny(folder / "ckpt")
            report = folder / "report"
            report.write_text("an earlier report\n")
            guard = Guard.of(folder)
            run = _cli("measure", source, "--json", report, "--markdown", report, *FAST, *FIT)
            name, needles = "measure --json R --markdown R (R exists)", ["report"]
    return _judge(name, family, run, 2, needles, guard=guard, seconds=elapsed())


# -- 3. hang: identify before opening -----------------------------------------------------


def _startup(ws: Workspace) -> float:
    """Seconds a plain input error (an empty directory) takes: the start-up a FIFO case may
    add :data:`FIFO_SECONDS` to (measured once)."""
    key = "round2-startup"
    cached = ws.root / "inputs" / key / "seconds"
    if not cached.exists():
        folder = _fresh(ws, key)
        (folder / "empty").mkdir()
        with timed() as elapsed:
            _cli("measure", folder / "empty", *FAST, timeout=HANG_SECONDS)
        cached.write_text(f"{elapsed():.3f}")
    return float(cached.read_text())


def _hang(ws: Workspace, *, kind: str) -> Outcome:
    family = "3 hang"
    startup = _startup(ws)
    folder = _fresh(ws, "round2", f"hang-{kind}")
    cwd = folder  # no pyproject.toml here: nothing declares a baseline but the card
    if kind == "fifo in dir":
        source = folder / "ckpt"
        source.mkdir()
        os.mkfifo(source / "model.safetensors")
        (source / "config.json").write_text('{"model_type": "mlp"}\n')
        args: list[str | Path | int] = ["measure", source, *FAST]
        name = "FIFO named model.safetensors in a checkpoint directory"
        needles = ["model.safetensors"]
    elif kind == "symlink":
        os.mkfifo(folder / "pipe")
        source = folder / "ckpt"
        source.mkdir()
        (source / "model.safetensors").symlink_to(folder / "pipe")
        args = ["measure", source, *FAST]
        name, needles = "symlink model.safetensors → a FIFO", ["model.safetensors"]
    elif kind == "fifo source":
        source = folder / "weights.safetensors"
        os.mkfifo(source)
        args = ["measure", source, *FAST]
        name, needles = "a FIFO as SOURCE", ["weights.safetensors"]
    elif kind == "dev zero":
        args = ["measure", "/dev/zero", *FAST]
        name, needles = "/dev/zero as SOURCE", ["/dev/zero"]
    else:  # the model card's base_model names a directory holding a FIFO
        base = folder / "base"
        base.mkdir()
        os.mkfifo(base / "model.safetensors")
        source = _tiny(folder / "finetune")
        (source / "README.md").write_text(f"---\nbase_model: {base}\nlicense: mit\n---\n# x\n")
        args = ["check", source, *FIT]
        name, needles = "model card base_model → a directory holding a FIFO", ["model.safetensors"]
    with timed() as elapsed:
        run = _cli(*args, cwd=cwd, timeout=HANG_SECONDS)
    seconds = elapsed()
    outcome = _judge(name, family, run, 3, needles, seconds=seconds, prompt=False)
    extra = seconds - startup
    if run.code != 124 and extra > FIFO_SECONDS:
        outcome = replace(outcome, ok=False,
                          detail=f"{outcome.detail} · {extra:.1f} s beyond start-up")  # fmt: skip
    return replace(outcome, expected=f"exit 3 in < {FIFO_SECONDS:g} s")


# -- 4. baseline: a closed world ----------------------------------------------------------


def _coords(copy: Path) -> list[Path]:
    return sorted((copy / "coords").glob("*.safetensors"))


def _drop_lines(copy: Path, names: Sequence[str]) -> None:
    manifest = copy / "manifest.json"
    entries = json.loads(manifest.read_text())
    for name in names:
        entries.pop(name, None)
    manifest.write_text(json.dumps(entries, indent=1))


def _unlisted(copy: Path) -> None:
    """One coordinate file's manifest line removed (the file unchanged)."""
    _drop_lines(copy, [f"coords/{_coords(copy)[0].name}"])


def _swapped(copy: Path) -> None:
    """fc1's and fc2's coordinate files (same shape) swapped, their manifest lines removed."""
    first, second = _coords(copy)[:2]
    held = first.read_bytes()
    first.write_bytes(second.read_bytes())
    second.write_bytes(held)
    _drop_lines(copy, [f"coords/{first.name}", f"coords/{second.name}"])


def _layers(copy: Path, change: Callable[[list[dict[str, object]]], None]) -> None:
    path = copy / "baseline.json"
    data = json.loads(path.read_text())
    change(data["layers"])
    path.write_text(json.dumps(data, indent=1))
    rehash_manifest(copy)


def _outside(copy: Path) -> None:
    """layers[0].coords = ../outside.safetensors, a real coordinate file beside the baseline;
    baseline.json re-hashed in the manifest."""
    shutil.copy(_coords(copy)[0], copy.parent / "outside.safetensors")

    def change(layers: list[dict[str, object]]) -> None:
        layers[0]["coords"] = "../outside.safetensors"

    _layers(copy, change)


def _passwd(copy: Path) -> None:
    def change(layers: list[dict[str, object]]) -> None:
        layers[0]["coords"] = "/etc/passwd"

    _layers(copy, change)


def _retensor(copy: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> None:
    path = _coords(copy)[0]
    tensors = load_file(str(path))
    change(tensors)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    rehash_manifest(copy)


def _wrong_shape(copy: Path) -> None:
    def change(t: dict[str, torch.Tensor]) -> None:
        t["cold.0"] = t["cold.0"][..., :-1, :].clone()  # one neuron fewer

    _retensor(copy, change)


def _nan(copy: Path) -> None:
    def change(t: dict[str, torch.Tensor]) -> None:
        t["cold.0"] = t["cold.0"].clone()
        t["cold.0"].view(-1)[0] = float("nan")

    _retensor(copy, change)


def _extra_seed(copy: Path) -> None:
    def change(t: dict[str, torch.Tensor]) -> None:
        t["cold.2"], t["null.2"] = t["cold.1"].clone(), t["null.1"].clone()

    _retensor(copy, change)


def _newer(copy: Path) -> None:
    path = copy / "baseline.json"
    data = json.loads(path.read_text())
    data["format_version"] = 42
    path.write_text(json.dumps(data, indent=1))
    rehash_manifest(copy)


_TAMPERED: dict[str, tuple[str, Callable[[Path], None]]] = {
    "unlisted": ("a coordinate file missing from the manifest", _unlisted),
    "swapped": ("two coordinate files swapped, their manifest lines removed", _swapped),
    "outside": ("layers[].coords = ../outside.safetensors", _outside),
    "passwd": ("layers[].coords = /etc/passwd", _passwd),
    "wrong-shape": ("coordinates of the wrong shape (re-hashed)", _wrong_shape),
    "nan": ("a NaN coordinate (re-hashed)", _nan),
    "extra-seed": ("an extra seed's coordinates (re-hashed)", _extra_seed),
}


def _tampered(ws: Workspace, *, name: str) -> Outcome:
    family = "4 baseline"
    with timed() as elapsed:
        folder = _fresh(ws, "round2", f"tampered-{name}")
        copy = shutil.copytree(_tiny_baseline(ws), folder / "baseline")
        # Every weight nudged, so that every layer is refitted and its coordinates read: a
        # layer bit-equal to the baseline's is not refitted, and its file is never read.
        source = _tiny(folder / "model", scale=0.1001)
        if name == "newer format":
            _newer(copy)
        else:
            _TAMPERED[name][1](copy)
        guard = Guard.of(folder)
        run = _cli("check", source, "--baseline", copy, *FIT, cwd=folder)
    if name != "newer format":
        return _judge(_TAMPERED[name][0], family, run, 3, ["tampered or corrupt"], guard=guard,
                      seconds=elapsed())  # fmt: skip
    # The version must be named: 42, outside any path the line quotes.
    line = _first_line(run).replace(str(folder), "")
    problems = [] if "42" in line else ["the line does not name format version 42"]
    return _judge("baseline.json format_version 42 (newer)", family, run, 3, [],
                  guard=guard, problems=problems, seconds=elapsed())  # fmt: skip


# -- 5. CI output from untrusted names ----------------------------------------------------


def _controls(where: str, text: str) -> list[str]:
    found = [f"{'ESC' if c == chr(27) else 'BEL'} in {where}" for c in CONTROL if c in text]
    return found


def _crafted_baseline(ws: Workspace) -> Path:
    return _baseline_of(ws, "crafted-baseline", _crafted)


def _ci_check(ws: Workspace) -> Outcome:
    """The crafted-name layer zeroed, checked inside GitHub Actions with every report: exit 1,
    JUnit parses, no ESC/BEL in stdout, stderr, step summary, $GITHUB_OUTPUT or a report."""
    family = "5 CI output"
    with timed() as elapsed:
        folder = _fresh(ws, "round2", "ci-check")
        damaged = _crafted(folder / CRAFTED_DIR, zero=True)
        summary, output = folder / "summary.md", folder / "output.txt"
        reports = {"--json": folder / "r.json", "--markdown": folder / "r.md",
                   "--junit": folder / "r.xml"}  # fmt: skip
        flags = [str(x) for pair in reports.items() for x in pair]
        env = {"GITHUB_ACTIONS": "true", "GITHUB_STEP_SUMMARY": str(summary),
               "GITHUB_OUTPUT": str(output)}  # fmt: skip
        run = _cli("check", damaged, "--baseline", _crafted_baseline(ws), *flags, *FIT, env=env)
        problems = _problems(run, (1,))
        problems += _controls("stdout", run.stdout) + _controls("stderr", run.stderr)
        for where, path in [("step summary", summary), ("$GITHUB_OUTPUT", output),
                            *[(flag, path) for flag, path in reports.items()]]:  # fmt: skip
            if path.exists():
                problems += _controls(where, path.read_text(errors="replace"))
            elif where != "$GITHUB_OUTPUT":
                problems.append(f"no {where} written")
        try:
            ET.fromstring(reports["--junit"].read_bytes())
        except (OSError, ET.ParseError) as exc:
            problems.append(f"JUnit does not parse: {exc}")
    return _row("check in GitHub Actions, every report, a crafted layer type", family,
                "exit 1, JUnit parses, no ESC/BEL", f"exit {run.code}", problems, elapsed(),
                "JUnit parses; no ESC/BEL in stdout, stderr, summary or reports")  # fmt: skip


def _ci_terminal(ws: Workspace, *, command: str) -> Outcome:
    """``inspect`` (its table) or ``measure`` (table and --markdown) of the crafted name."""
    family = "5 CI output"
    with timed() as elapsed:
        folder = _fresh(ws, "round2", f"ci-{command}")
        source = _crafted(folder / CRAFTED_DIR)
        md = folder / "r.md"
        if command == "inspect":
            run = _cli("inspect", source)
        else:
            run = _cli("measure", source, "--markdown", md, *FAST, *FIT)
        problems = _problems(run, (0,))
        problems += _controls("stdout", run.stdout) + _controls("stderr", run.stderr)
        if md.exists():
            problems += _controls("--markdown", md.read_text(errors="replace"))
        if run.code == 0 and "pwned" not in run.stdout:
            problems.append("the crafted layer is not in the table")
    name = "inspect's table" if command == "inspect" else "measure's table and --markdown"
    return _row(f"{name}, a crafted tensor name", family, "exit 0, no ESC/BEL", f"exit {run.code}",
                problems, elapsed(), "no ESC/BEL")  # fmt: skip


def _summary_unwritable(ws: Workspace) -> Outcome:
    """GITHUB_STEP_SUMMARY naming a directory (unwritable, even for root), a failing gate:
    the verdict's exit 1, a warning at most."""
    family = "6 exit code"
    with timed() as elapsed:
        folder = _fresh(ws, "round2", "summary-unwritable")
        damaged = _crafted(folder / "damaged", zero=True)
        (folder / "summary-dir").mkdir()
        env = {"GITHUB_ACTIONS": "true", "GITHUB_STEP_SUMMARY": str(folder / "summary-dir")}
        run = _cli("check", damaged, "--baseline", _crafted_baseline(ws), *FIT, env=env)
        problems = _problems(run, (1,))
    return _row("unwritable GITHUB_STEP_SUMMARY, failing gate", family, "exit 1",
                f"exit {run.code}", problems, elapsed(), _first_line(run))  # fmt: skip


# -- 6. exit codes: output errors ---------------------------------------------------------


def _unwritable(folder: Path, where: str, name: str) -> tuple[Path, Callable[[], None]]:
    """An output path ``name`` that cannot be written, and how to undo the setup.

    read-only: a directory without write permission (as root, whom permissions do not stop:
    a new file under /sys, refused by the kernel the same way); parent-file: under a regular
    file; directory: an existing directory; full: a new file in a writable directory, the disk
    being full (see ``max_file_bytes``). Never /dev/full itself: before the fix an atomic
    write renamed the report over the device node; fifo: an existing FIFO."""
    if where == "read-only":
        if os.geteuid() == 0:
            return Path("/sys") / f"dynaudit-round2-{name}", lambda: None
        ro = folder / "read-only"
        ro.mkdir()
        ro.chmod(stat.S_IRUSR | stat.S_IXUSR)
        return ro / name, lambda: ro.chmod(stat.S_IRWXU)
    if where == "parent-file":
        (folder / "notes.txt").write_text("the user's notes\n")
        return folder / "notes.txt" / name, lambda: None
    if where == "fifo":  # a special file the user has there: never replaced by a report
        os.mkfifo(folder / name)
        return folder / name, lambda: None
    if where == "directory":
        (folder / name).mkdir()
        (folder / name / "keep.txt").write_text("kept\n")
        return folder / name, lambda: None
    return folder / name, lambda: None


def _output_error(ws: Workspace, *, flag: str, where: str) -> Outcome:
    family = "6 exit code"
    codes = (3,) if where in ("read-only", "full") else (3, 2)
    with timed() as elapsed:
        folder = _fresh(ws, "round2", f"out-{_slug(flag)}-{where}")
        filename = {"--json": "r.json", "--markdown": "r.md", "baseline --out": "bl",
                    "plot --out": "p.png"}[flag]  # fmt: skip
        target, undo = _unwritable(folder, where, filename)
        try:
            if flag.startswith("--"):
                source = _tiny(folder / "ckpt")
                guard = Guard.of(folder)
                full = 2048 if where == "full" else None  # a report is larger than this
                # The report's write is the case: on a full disk the result cache would add
                # its own warning line (and does, as documented), so it is left out.
                no_cache = ["--no-cache"] if where == "full" else []
                run = _cli("measure", source, flag, target, *FAST, *FIT, *no_cache,
                           max_file_bytes=full)  # fmt: skip
            elif flag == "baseline --out":
                source = _tiny(folder / "ckpt")
                guard = Guard.of(folder)
                run = _cli("baseline", source, "--out", target, "--seeds", "1", *FAST, *FIT)
            else:
                reports = _tiny_reports(ws)
                guard = Guard.of(folder)
                run = _cli("plot", reports / "a.json", reports / "b.json", "--out", target)
        finally:
            undo()
    label = {
        "read-only": "in a read-only directory", "parent-file": "under a regular file",
        "directory": "an existing directory", "full": "on a full disk (RLIMIT_FSIZE)",
        "fifo": "an existing FIFO",
    }[where]  # fmt: skip
    needle = filename
    problems = []
    if where == "fifo" and not stat.S_ISFIFO(os.lstat(target).st_mode):
        problems.append(f"{filename}, a FIFO, was replaced")
    return _judge(f"{flag} {label}", family, run, codes, [needle], guard=guard,
                  problems=problems, seconds=elapsed(), prompt=False)  # fmt: skip


# -- 6. exit codes: crafted inputs --------------------------------------------------------


def _lone_surrogate(folder: Path) -> Path:
    """A header whose tensor name is a lone surrogate (valid JSON, ``"\\udc80"``)."""
    out = folder / "ckpt"
    out.mkdir()
    f32 = {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]}
    second = {"dtype": "F32", "shape": [4, 4], "data_offsets": [64, 128]}
    raw_safetensors(out / "model.safetensors", {"fc.weight": f32, "w\udc80.weight": second},
                    torch.randn(32).numpy().tobytes())  # fmt: skip
    return out


def _llama_projection(ws: Workspace, folder: Path, shape: tuple[int, ...]) -> Path:
    """The LLaMA base with one q_proj replaced by a tensor of ``shape``."""
    out = shutil.copytree(ws.base("llama"), folder / "llama")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shard = out / index["weight_map"][_Q]
    tensors = load_file(str(shard))
    tensors[_Q] = torch.randn(*shape) * 0.02
    save_file(tensors, str(shard), metadata={"format": "pt"})
    return out


def _conv_no_inputs(ws: Workspace, folder: Path) -> Path:
    """The CNN base (torchvision ResNet-18 names) with one block's conv1 of 0 input channels."""
    out = shutil.copytree(ws.base("cnn"), folder / "cnn")
    tensors = load_file(str(out / "model.safetensors"))
    tensors["layer1.0.conv1.weight"] = torch.zeros(8, 0, 3, 3)
    save_file(tensors, str(out / "model.safetensors"))
    return out


def _crafted_input(ws: Workspace, *, name: str) -> Outcome:
    family = "6 exit code"
    with timed() as elapsed:
        folder = _fresh(ws, "round2", _slug(name))
        if name == "lone-surrogate tensor name":
            source = _lone_surrogate(folder)
        elif name == "conv with 0 input channels":
            source = _conv_no_inputs(ws, folder)
        else:
            # 3-D with as many leading rows as heads × head_dim, so the row check lets it by.
            shape = {"LLaMA q_proj 1-D": (64,), "LLaMA q_proj 3-D": (64, 2, 32),
                     "LLaMA q_proj with 0 rows": (0, 64),
                     "LLaMA q_proj with 0 columns": (64, 0)}[name]  # fmt: skip
            source = _llama_projection(ws, folder, shape)
        guard = Guard.of(folder)
        run = _cli("measure", source, *FAST, *FIT)
    return _judge(name, family, run, 3, [], guard=guard, seconds=elapsed())


# LoRA adapters over the tiny model: fc1 (32 × 32) with r 4.
def _adapter(folder: Path, base: Path | str | list[str], **config: object) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    settings: dict[str, object] = {
        "peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["fc1"],
        "base_model_name_or_path": base if isinstance(base, list) else str(base),
        "task_type": None,
    }  # fmt: skip
    settings.update(config)
    (folder / "adapter_config.json").write_text(json.dumps(settings))
    rank = int(settings["r"]) if isinstance(settings["r"], int) else 4
    gen = torch.Generator().manual_seed(1)
    save_file({"base_model.model.fc1.lora_A.weight": torch.randn(rank, 32, generator=gen) * 0.01,
               "base_model.model.fc1.lora_B.weight": torch.randn(32, rank, generator=gen) * 0.01},
              str(folder / "adapter_model.safetensors"))  # fmt: skip
    return folder


_LORA: dict[str, dict[str, object]] = {
    "r: 0": {"r": 0},
    "r: a string": {"r": "four"},
    "r: null": {"r": None},
    "lora_alpha: a string": {"lora_alpha": "eight"},
    "lora_alpha: null": {"lora_alpha": None},
    "rank_pattern: an invalid regex": {"rank_pattern": {"fc(": 4}},
    "rank_pattern: a list": {"rank_pattern": ["fc1"]},
}


def _lora(ws: Workspace, *, name: str) -> Outcome:
    family = "6 exit code"
    with timed() as elapsed:
        folder = _fresh(ws, "round2", "lora-" + _slug(name))
        base = _tiny(folder / "base")
        if name == "a well-formed adapter (control)":
            source = _adapter(folder / "adapter", base)
        elif name == "base_model_name_or_path: a list":
            source = _adapter(folder / "adapter", [str(base)])
        elif name == "0-d lora_B":
            source = _adapter(folder / "adapter", base)
            weights = source / "adapter_model.safetensors"
            tensors = load_file(str(weights))
            tensors["base_model.model.fc1.lora_B.weight"] = torch.tensor(0.5)
            save_file(tensors, str(weights))
        else:
            source = _adapter(folder / "adapter", base, **_LORA[name])
        guard = Guard.of(folder)
        run = _cli("measure", source, *FAST, *FIT, cwd=folder)
    if name.endswith("(control)"):
        return _row(f"LoRA {name}", family, "exit 0", f"exit {run.code}", _problems(run, (0,)),
                    elapsed(), "merged and measured")  # fmt: skip
    return _judge(f"LoRA {name}", family, run, 3, [], guard=guard, seconds=elapsed())


# -- 7. messages --------------------------------------------------------------------------


def _cycle(ws: Workspace, *, length: int) -> Outcome:
    """An adapter whose base is itself (``length`` 1) or A → B → A: exit 3 naming the cycle,
    never "header is not JSON"."""
    family = "7 message"
    with timed() as elapsed:
        folder = _fresh(ws, "round2", f"cycle-{length}")
        a, b = folder / "adapter-a", folder / "adapter-b"
        if length == 1:
            _adapter(a, a)
        else:
            _adapter(a, b)
            _adapter(b, a)
        guard = Guard.of(folder)
        run = _cli("measure", a, *FAST, *FIT, cwd=folder)
        line = _first_line(run).lower()
        problems = (
            []
            if any(w in line for w in ("cycle", "itself", "loop", "circular"))
            else ["the line does not say it is a cycle"]
        )
        if "not json" in line:
            problems.append('says "not JSON"')
    names = ["adapter-a"] if length == 1 else ["adapter-a", "adapter-b"]
    name = "adapter whose base is itself" if length == 1 else "adapters A → B → A"
    return _judge(name, family, run, 3, names, guard=guard, problems=problems,
                  seconds=elapsed())  # fmt: skip


def _policy(ws: Workspace, *, kind: str) -> Outcome:
    family = "7 message"
    with timed() as elapsed:
        folder = _fresh(ws, "round2", f"policy-{kind}")
        source = _tiny(folder / "model")
        baseline = _tiny_baseline(ws)
        extra: list[str | Path | int] = []
        if kind == "wrong type":
            (folder / "policy.toml").write_text('max_drop_all = "lots"\n')
            extra = ["--policy", folder / "policy.toml"]
            name, needles = 'policy max_drop_all = "lots"', ["max_drop_all"]
        elif kind == "unknown key":
            (folder / "policy.toml").write_text("max_drop_everything = 3\n")
            extra = ["--policy", folder / "policy.toml"]
            name, needles = "policy with an unknown key", ["max_drop_everything"]
        else:
            extra = ["--max-drop-all", "-5"]
            name, needles = "--max-drop-all -5, no pyproject.toml", ["max"]
        run = _cli("check", source, "--baseline", baseline, *extra, *FIT, cwd=folder)
        line = _first_line(run)
        problems = []
        if "1 validation error" in line and not any(n in line for n in needles):
            problems.append("only pydantic's summary")
        if kind == "flag":
            if "pyproject" in line:
                problems.append("blames a pyproject.toml that does not exist")
            if "max-drop-all" not in line and "max_drop_all" not in line:
                problems.append("does not name --max-drop-all")
    return _judge(name, family, run, 2, needles, problems=problems, seconds=elapsed())


def _plot_method(ws: Workspace) -> Outcome:
    family = "7 message"
    with timed() as elapsed:
        folder = _fresh(ws, "round2", "plot-method")
        run = _cli("plot", _tiny_baseline(ws), "--method", "bogus", "--out", folder / "p.png")
        problems = ["wrote p.png"] if (folder / "p.png").exists() else []
    return _judge("plot --method bogus", family, run, 2, ["bogus"], problems=problems,
                  seconds=elapsed())  # fmt: skip


# -- 8. secrets echoed by a server ----------------------------------------------------------

TOKEN = "SECRETcanary+echo/TOKEN=7f3a&x"
USER, PASSWORD = "canary-user", "SECRETcanary/echo+PASSWORD=9c"
HF_ECHO_TOKEN = "hf_SECRETcanaryECHO4b2d6f8a0c1e3"


def _forms(secret: str) -> dict[str, str]:
    return {"": secret, " (base64)": base64.b64encode(secret.encode()).decode(),
            " (URL-encoded)": quote(secret, safe="")}  # fmt: skip


class _Echo(BaseHTTPRequestHandler):
    """Every request answered 400 with a JSON error quoting its Authorization header, raw
    and URL-encoded, as a misconfigured proxy or debugging server does."""

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _echo(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        auth = self.headers.get("Authorization", "")
        text = f"echo Authorization: {auth} ({quote(auth, safe='')})"
        body = json.dumps({"error_code": "INVALID_PARAMETER_VALUE", "message": text,
                           "error": text}).encode()  # fmt: skip
        self.send_response(400)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Error-Message", text)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_POST = do_HEAD = do_PUT = do_PATCH = _echo


def _echo_secrets(ws: Workspace, *, kind: str) -> Outcome:
    family = "8 secrets"
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    folder = _fresh(ws, "round2", f"echo-{kind}")
    caches = {"HF_HOME": str(folder / "hf-home"), "DYNAUDIT_CACHE_DIR": str(folder / "cache"),
              "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}  # fmt: skip
    try:
        with timed() as elapsed:
            if kind == "mlflow token":
                secrets = _forms(TOKEN)
                run = _cli(
                    "measure",
                    "models:/m/1",
                    "--mlflow-uri",
                    url,
                    *FAST,
                    env={**caches, "MLFLOW_TRACKING_TOKEN": TOKEN},
                    timeout=120,
                )
                name = "MLFLOW_TRACKING_TOKEN, MLflow server echoing Authorization"
            elif kind == "mlflow basic":
                secrets = {
                    **_forms(PASSWORD),
                    " (user:password base64)": base64.b64encode(
                        f"{USER}:{PASSWORD}".encode()
                    ).decode(),
                }
                run = _cli("measure", "models:/m/1", "--mlflow-uri", url, *FAST,
                           env={**caches, "MLFLOW_TRACKING_USERNAME": USER,
                                "MLFLOW_TRACKING_PASSWORD": PASSWORD}, timeout=120)  # fmt: skip
                name = "MLFLOW_TRACKING_USERNAME/PASSWORD, server echoing Authorization"
            else:
                secrets = _forms(HF_ECHO_TOKEN)
                run = _cli(
                    "measure",
                    "hf://org/model",
                    "--hf-endpoint",
                    url,
                    *FAST,
                    env={**caches, "HF_TOKEN": HF_ECHO_TOKEN},
                    timeout=120,
                )
                name = "HF_TOKEN, Hub endpoint echoing Authorization"
    finally:
        server.shutdown()
        server.server_close()
    found = [f"token{form} on {where}" for form, secret in secrets.items()
             for where, text in (("stdout", run.stdout), ("stderr", run.stderr))
             if secret in text]  # fmt: skip
    problems = found + _problems(run, (3,))
    return _row(name, family, "exit 3, not printed", "printed" if found else f"exit {run.code}",
                problems, elapsed(), _first_line(run))  # fmt: skip


# -- 9. cost --------------------------------------------------------------------------------

MANY_LAYERS = 2000
MANY_SECONDS = 60.0


def _many_layers(ws: Workspace) -> Outcome:
    """``measure`` of 2,000 2 × 2 tensors at the tests' small fit: within a minute (it took
    163 s before; bench/layers.py measures the 2k/5k/20k series)."""
    family = "9 cost"
    with timed() as elapsed:
        folder = _fresh(ws, "round2", "many-layers")
        gen = torch.Generator().manual_seed(0)
        (folder / "ckpt").mkdir()
        save_file(
            {f"layers.{i}.weight": torch.randn(2, 2, generator=gen) for i in range(MANY_LAYERS)},
            str(folder / "ckpt" / "model.safetensors"),
        )
        made = elapsed()
        run = _cli("measure", folder / "ckpt", "--quiet", "--no-cache", "--json",
                   folder / "r.json", *FAST, *FIT, timeout=2 * MANY_SECONDS)  # fmt: skip
        seconds = elapsed() - made
    problems = _problems(run, (0,))
    if seconds > MANY_SECONDS:
        problems.append(f"took {seconds:.0f} s (bound {MANY_SECONDS:.0f} s)")
    return _row(f"measure, {MANY_LAYERS} same-shape 2×2 tensors", family,
                f"exit 0 in < {MANY_SECONDS:.0f} s", f"exit {run.code}, {seconds:.0f} s",
                problems, seconds, f"{seconds:.1f} s")  # fmt: skip


def _stale_staging(ws: Workspace) -> Outcome:
    """A killed baseline's staging directory, two days old, beside ``--out``: swept by the
    next ``baseline`` to that place; a fresh one (another writer's, maybe) kept."""
    family = "9 cost"
    with timed() as elapsed:
        folder = _fresh(ws, "round2", "stale-staging")
        source = _tiny(folder / "ckpt")
        out = folder / "runs" / "bl"
        stale = folder / "runs" / f".bl.tmp-{'a' * 32}"
        fresh = folder / "runs" / f".bl.tmp-{'b' * 32}"
        for staging in (stale, fresh):
            (staging / "coords").mkdir(parents=True)
            (staging / "coords" / "00000.safetensors").write_bytes(b"half written")
        old = time.time() - 2 * 86400
        for path in (stale / "coords" / "00000.safetensors", stale / "coords", stale):
            os.utime(path, (old, old))
        run = _cli("baseline", source, "--out", out, "--seeds", "1", *FAST, *FIT)
        problems = _problems(run, (0,))
        if stale.exists():
            problems.append("the 2-day-old staging directory is still there")
        if not fresh.exists():
            problems.append("a fresh staging directory was removed too")
    return _row("a killed baseline's 2-day-old staging directory", family,
                "exit 0, stale swept, fresh kept", f"exit {run.code}", problems, elapsed(),
                "swept")  # fmt: skip


# -- the table ------------------------------------------------------------------------------


def _cases() -> list[Case]:
    def case(family: str, name: str, run: Callable[[Workspace], Outcome]) -> Case:
        return Case(TABLE, name, family, run)

    cases = [
        case("1 false pass", "measure ambiguous dir", partial(_false_pass, command="measure")),
        case("1 false pass", "check ambiguous dir", partial(_false_pass, command="check")),
        case("1 false pass", "check ambiguous Hub repo", partial(_false_pass, command="hub")),
    ]
    cases += [
        case("2 data loss", kind, partial(_data_loss, kind=kind))
        for kind in ("checkpoint", "baseline", "plot", "demo", "two outputs")
    ]
    cases += [
        case("3 hang", kind, partial(_hang, kind=kind))
        for kind in ("fifo in dir", "symlink", "fifo source", "dev zero", "card base_model")
    ]
    cases += [
        case("4 baseline", name, partial(_tampered, name=name))
        for name in [*_TAMPERED, "newer format"]
    ]
    cases += [
        case("5 CI output", "check in GitHub Actions", _ci_check),
        case("5 CI output", "inspect table", partial(_ci_terminal, command="inspect")),
        case("5 CI output", "measure table", partial(_ci_terminal, command="measure")),
    ]
    outputs = [
        ("--json", "read-only"), ("--json", "parent-file"), ("--json", "directory"),
        ("--json", "full"), ("--json", "fifo"), ("--markdown", "read-only"),
        ("--markdown", "parent-file"),
        ("baseline --out", "read-only"), ("baseline --out", "parent-file"),
        ("plot --out", "read-only"), ("plot --out", "parent-file"), ("plot --out", "directory"),
    ]  # fmt: skip
    cases += [
        case(
            "6 exit code", f"{_slug(flag)}-{where}", partial(_output_error, flag=flag, where=where)
        )
        for flag, where in outputs
    ]
    cases.append(case("6 exit code", "unwritable step summary", _summary_unwritable))
    cases += [
        case("6 exit code", name, partial(_crafted_input, name=name))
        for name in ("lone-surrogate tensor name", "LLaMA q_proj 1-D", "LLaMA q_proj 3-D",
                     "LLaMA q_proj with 0 rows", "LLaMA q_proj with 0 columns",
                     "conv with 0 input channels")
    ]  # fmt: skip
    cases += [
        case("6 exit code", f"lora-{_slug(name)}", partial(_lora, name=name))
        for name in ["a well-formed adapter (control)", *_LORA,
                     "base_model_name_or_path: a list", "0-d lora_B"]
    ]  # fmt: skip
    cases += [
        case("7 message", "adapter base itself", partial(_cycle, length=1)),
        case("7 message", "adapter cycle A-B-A", partial(_cycle, length=2)),
        case("7 message", "policy wrong type", partial(_policy, kind="wrong type")),
        case("7 message", "policy unknown key", partial(_policy, kind="unknown key")),
        case("7 message", "bad flag value", partial(_policy, kind="flag")),
        case("7 message", "plot method bogus", _plot_method),
        case("8 secrets", "mlflow token", partial(_echo_secrets, kind="mlflow token")),
        case("8 secrets", "mlflow basic", partial(_echo_secrets, kind="mlflow basic")),
        case("8 secrets", "hub token", partial(_echo_secrets, kind="hub")),
        case("9 cost", "many layers", _many_layers),
        case("9 cost", "stale staging", _stale_staging),
    ]
    return cases


CASES = _cases()


# -- the docs table -------------------------------------------------------------------------


def _cell(row: dict[str, object] | None) -> str:
    if row is None:
        return "—"
    mark = "✓" if row["ok"] else "✗"
    return f"{mark} {row['actual']}".replace("|", "\\|")


def markdown(before: list[dict[str, object]], after: list[dict[str, object]]) -> str:
    """docs/reliability.md's round-two table from two ``--out`` files (before and after)."""
    then = {str(r["case"]): r for r in before if r["table"] == TABLE}
    now = {str(r["case"]): r for r in after if r["table"] == TABLE}
    lines = ["| group | case | expected | before | after |", "|---|---|---|---|---|"]
    for name, row in {**then, **now}.items():
        case = name.replace("|", "\\|")
        lines.append(f"| {row['family']} | {case} | {row['expected']} | "
                     f"{_cell(then.get(name))} | {_cell(now.get(name))} |")  # fmt: skip
    ok = sum(bool(r["ok"]) for r in now.values())
    lines.append("")
    lines.append(f"After: {ok} of {len(now)} as expected (before: "
                 f"{sum(bool(r['ok']) for r in then.values())} of {len(then)}).")  # fmt: skip
    return "\n".join(lines) + "\n"
