"""Every medium dynaudit writes gets the same crafted tensor names (issue 18, item 5).

A name can hold an ANSI sequence that erases a terminal line and prints a forged verdict,
BEL, a BiDi override, line breaks, a GitHub workflow command, Markdown/HTML metacharacters
or characters XML 1.0 forbids. Whatever the medium (terminal tables of measure, check and
inspect; stderr messages; JUnit XML; ``::error`` annotations; the job summary; ``--markdown``),
the output must carry no ESC or BEL byte, no other control or invisible format character,
no line that starts a workflow command other than our own annotations, a JUnit file that
parses and Markdown tables that keep their columns.
"""

from __future__ import annotations

import os
import re
import shutil
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
import torch
from rich.console import Console
from safetensors.torch import save_file

from dynaudit.errors import NonFiniteWeights
from dynaudit.reports.ci import github_annotations, render_junit, report_to_github
from dynaudit.reports.escape import (
    escape_command_data,
    escape_command_property,
    escape_markdown,
    escape_terminal,
    escape_xml,
    markdown_code,
)
from tests.cli import run_cli

# The crafted names, each a whole tensor name of a generic-family checkpoint (the family
# turns the part before ".weight" into the layer type, so types are crafted too).
CRAFTED = [
    "blocks.0.\x1b[2K\x1b[1Gverdict: PASS.weight",
    "blocks.1.bell\x07\x07.weight",
    "blocks.2.\u202egnp.exe\u202c\u2066iso\u2069\u200e\u200f\u061c.weight",
    "blocks.3.evil\n::error::pwned\r\n.weight",
    "::error::blocks.4.weight",
    "blocks.5.md | `code` <b>&amp; [x](http://y) *em* _u_ # h.weight",
    "blocks.6.xml\x00\x0b\x0c\ufffe]]><!--.weight",
    "blocks.7.sep\u2028line\u2029\x85\x9b2K\x7f.weight",
]
# Names that cannot be a tensor of a saved checkpoint but can reach a renderer (a path, a
# server message): a lone surrogate, an astral tag character, a C1 CSI.
EXTRA = ["lone\ud800surrogate", "tag\U000e0041hidden", "\x9b31mred"]
# ESC and BEL, every other C0/C1 control but the line feed, BiDi controls and marks,
# invisible format characters, line and paragraph separators, surrogates, noncharacters.
FORBIDDEN = re.compile(
    "[\x00-\x09\x0b-\x1f\x7f-\x9f\xad\u061c\u200b-\u200f\u2028-\u202e\u2060-\u206f\ufeff"
    "\ufffe\uffff\ud800-\udfff\U000e0000-\U000e007f]"
)
FAST: dict[str, Any] = {"q_dim": 16, "pieces": 4, "steps": 30, "threads": 1}
FAST_FLAGS = ["--q-dim", "16", "--pieces", "4", "--steps", "30"]
_ANNOTATION = re.compile(r"^::error title=[^:,\n]*::[^\n]*$")


def assert_clean(text: str, where: str) -> None:
    """No forbidden character, and no line a GitHub runner would take for a command (it
    ignores leading blanks) unless it is one of our own well-formed annotations."""
    bad = FORBIDDEN.search(text)
    assert bad is None, f"{where}: {bad.group()!r} at {bad.start()}: {text[: bad.end()][-80:]!r}"
    for line in text.split("\n"):
        if line.lstrip().startswith("::"):
            assert _ANNOTATION.match(line), f"{where} starts a workflow command: {line!r}"


def _cells(row: str) -> int:
    """Cells of a GFM table row: ``|`` separators not escaped by an odd run of backslashes."""
    pipes = [m for m in re.finditer(r"(\\*)\|", row) if len(m.group(1)) % 2 == 0]
    return len(pipes) - 1


def assert_tables_keep_columns(markdown: str, where: str) -> int:
    """Every row of every Markdown table has its header's cell count; returns the rows."""
    rows = 0
    header: int | None = None
    for line in markdown.split("\n"):
        if not line.startswith("|"):
            header = None
            continue
        if header is None:
            header = _cells(line)
            continue
        assert _cells(line) == header, f"{where}: {line!r} has not {header} cells"
        rows += 1
    return rows


# -- the escaping functions, one per medium ------------------------------------------------


@pytest.mark.parametrize("name", CRAFTED + EXTRA)
@pytest.mark.parametrize(
    "escape",
    [escape_terminal, escape_xml, escape_command_data, escape_command_property,
     escape_markdown, markdown_code],
)  # fmt: skip
def test_every_escaping_function_neutralises_every_crafted_name(name: str, escape: Any) -> None:
    out = escape(name)
    assert FORBIDDEN.search(out) is None and "\n" not in out, (escape.__name__, out)
    assert out.encode("utf-8")  # a lone surrogate would raise here, and in every writer


def test_markdown_code_spans_cannot_be_closed_early() -> None:
    assert markdown_code("a`b") == "``a`b``"
    assert markdown_code("`edge`") == "`` `edge` ``"
    assert markdown_code("") == "` `"
    assert markdown_code("a|b", in_table=True) == "`a\\|b`"
    assert markdown_code("new\nline") == "`new\\nline`"


def test_workflow_command_escaping() -> None:
    assert escape_command_data("a%\r\nb\x1b[2K\x07") == "a%25%0D%0Ab\\x1b[2K\\x07"
    assert escape_command_property("dynaudit: x,y") == "dynaudit%3A x%2Cy"


def test_the_xml_escape_keeps_a_document_well_formed() -> None:
    for name in CRAFTED + EXTRA:
        root = ET.Element("testcase", name=escape_xml(name))
        root.text = escape_xml(name)
        ET.fromstring(ET.tostring(root, encoding="unicode"))


# -- real reports from a checkpoint with crafted names ---------------------------------------


def _write(folder: Path, *, damaged: bool = False, nan: bool = False) -> Path:
    """A generic-family chain of Linear weights named :data:`CRAFTED`; ``damaged`` zeroes
    the ESC and newline layers, ``nan`` poisons the ESC layer."""
    gen = torch.Generator().manual_seed(0)
    dims = [16, 24] * (len(CRAFTED) // 2) + [16]
    tensors = {
        name: torch.randn(dims[i + 1], dims[i], generator=gen) * 0.1
        for i, name in enumerate(CRAFTED)
    }
    if damaged:
        tensors[CRAFTED[0]] = torch.zeros_like(tensors[CRAFTED[0]])
        tensors[CRAFTED[3]] = torch.zeros_like(tensors[CRAFTED[3]])
    if nan:
        tensors[CRAFTED[0]][1, 2] = float("nan")
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "model.safetensors"))
    return folder


@pytest.fixture(scope="module")
def crafted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The checkpoints, a stored baseline and the measure, inspect and check results."""
    import dynaudit

    root = tmp_path_factory.mktemp("crafted")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("DYNAUDIT_CACHE_DIR", str(root / "cache"))
        env.setenv("HF_HOME", str(root / "hf-home"))
        clean = _write(root / "clean")
        damaged = _write(root / "damaged", damaged=True)
        baseline = root / "baseline"
        dynaudit.baseline(clean, baseline, seeds=2, **FAST)
        yield {
            "root": root, "clean": clean, "damaged": damaged, "baseline": baseline,
            "measure": dynaudit.measure(clean, cache=False, **FAST),
            "inspect": dynaudit.inspect(clean),
            "check": dynaudit.check(damaged, baseline, cache=False, threads=1),
        }  # fmt: skip


def _consoles() -> Iterator[tuple[str, Console, StringIO]]:
    for width in (40, 140):  # narrow: every cell and title wraps or folds
        out = StringIO()
        yield f"width {width}", Console(file=out, width=width), out


def test_the_crafted_names_reach_every_report(crafted: dict[str, Any]) -> None:
    """The fixture is what the other tests think it is: every name measured and inspected
    as a layer, the check failing on the damaged crafted layers."""
    assert sorted(layer.name for layer in crafted["measure"].measured) == sorted(CRAFTED)
    assert sorted(layer.name for layer in crafted["inspect"].layers) == sorted(CRAFTED)
    check = crafted["check"]
    assert not check.verdict.passed
    assert {CRAFTED[0], CRAFTED[3]} <= set(check.verdict.failing_layers)
    assert "\x1b[2K\x1b[1Gverdict: PASS" in check.comparison.types


def test_terminal_tables_of_measure_check_and_inspect(crafted: dict[str, Any]) -> None:
    """Regression: inspect's table printed ``Text(layer.name)``, raw ANSI included, so a
    name could erase the line and print "verdict: PASS"; titles were wrapped by rich, so a
    name could start a line of its own."""
    from dynaudit.reports.check import render_check_terminal
    from dynaudit.reports.inspect import render_inspection
    from dynaudit.reports.terminal import render_terminal

    for where, console, out in _consoles():
        render_terminal(crafted["measure"], console)
        render_check_terminal(crafted["check"], console)
        render_inspection(crafted["inspect"], console)
        text = out.getvalue()
        assert_clean(text, where)
        assert "\\x1b[2K\\x1b[1Gverdict: PASS" in text.replace("\n", "") or where != "width 140"
        assert "verdict: fail" in text


def test_terminal_colours_are_ours_only(crafted: dict[str, Any]) -> None:
    """On a colour terminal the only escape sequences are rich's own SGR styles."""
    from dynaudit.reports.check import render_check_terminal
    from dynaudit.reports.inspect import render_inspection
    from dynaudit.reports.terminal import render_terminal

    out = StringIO()
    console = Console(file=out, width=120, force_terminal=True, color_system="truecolor")
    render_terminal(crafted["measure"], console)
    render_check_terminal(crafted["check"], console)
    render_inspection(crafted["inspect"], console)
    styled = out.getvalue()
    assert "\x1b[" in styled  # rich did colour it
    assert_clean(re.sub("\x1b\\[[0-9;]*m", "", styled), "colour terminal")


def test_junit_xml_parses_with_every_crafted_name(crafted: dict[str, Any]) -> None:
    """Regression: the "type …" test case was named with the raw layer type, and the file
    was not well-formed XML."""
    xml = render_junit(crafted["check"])
    assert_clean(xml, "JUnit")
    root = ET.fromstring(xml)
    names = [case.get("name") or "" for case in root.iter("testcase")]
    assert "type \\x1b[2K\\x1b[1Gverdict: PASS" in names
    failures = [f.get("message") or "" for f in root.iter("failure")]
    assert any("\\x1b[2K" in f for f in failures)
    for element in root.iter():
        for value in [element.text or "", *element.attrib.values()]:
            assert FORBIDDEN.search(value) is None


def test_annotations_step_summary_and_markdown(crafted: dict[str, Any], tmp_path: Path) -> None:
    from dynaudit.reports.check import render_check_markdown
    from dynaudit.reports.markdown import render_markdown

    check = crafted["check"]
    annotations = github_annotations(check)
    assert annotations and all(_ANNOTATION.match(line) for line in annotations)
    assert_clean("\n".join(annotations), "annotations")
    summary = tmp_path / "summary.md"
    env = {"GITHUB_ACTIONS": "true", "GITHUB_STEP_SUMMARY": str(summary)}
    assert report_to_github(check, env) == annotations
    for where, text in [
        ("step summary", summary.read_text(encoding="utf-8")),
        ("check --markdown", render_check_markdown(check)),
        ("measure --markdown", render_markdown(crafted["measure"])),
    ]:
        assert_clean(text, where)
        assert assert_tables_keep_columns(text, where) >= len(CRAFTED)
        assert "<b>" not in text and "<!--" not in text


def test_stderr_messages_of_crafted_names() -> None:
    message = NonFiniteWeights(CRAFTED + EXTRA).message
    assert_clean(message, "NonFiniteWeights")
    assert "\n" not in message


# -- GitHub Actions side channels --------------------------------------------------------------


def _unwritable(tmp_path: Path) -> list[Path]:
    """Paths no step summary can be appended to: a missing directory, a directory, and (when
    permissions are enforced) a read-only file."""
    folder = tmp_path / "a-directory"
    folder.mkdir()
    paths = [tmp_path / "missing" / "summary.md", folder]
    if os.geteuid() != 0:
        locked = tmp_path / "read-only.md"
        locked.write_text("")
        locked.chmod(0o444)
        paths.append(locked)
    return paths


def test_an_unwritable_step_summary_is_a_warning(
    crafted: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Regression: an unwritable $GITHUB_STEP_SUMMARY raised OSError, so a failed gate (1)
    became an internal error (4)."""
    output = tmp_path / "output"
    paths = _unwritable(tmp_path)
    for path in paths:
        env = {"GITHUB_ACTIONS": "true", "GITHUB_STEP_SUMMARY": str(path),
               "GITHUB_OUTPUT": str(output)}  # fmt: skip
        assert report_to_github(crafted["check"], env) == github_annotations(crafted["check"])
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and err[0].startswith("dynaudit: warning: could not write"), err
        assert "$GITHUB_STEP_SUMMARY" in err[0]
    assert output.read_text() == "verdict=fail\n" * len(paths)  # the verdict still written
    env = {"GITHUB_ACTIONS": "true", "GITHUB_OUTPUT": str(tmp_path / "gone" / "output")}
    report_to_github(crafted["check"], env)
    assert "$GITHUB_OUTPUT" in capsys.readouterr().err


# -- the CLI, end to end ---------------------------------------------------------------------


def test_check_in_github_actions_end_to_end(crafted: dict[str, Any], tmp_path: Path) -> None:
    """`check` of the damaged crafted checkpoint inside GitHub Actions: exit 1; stdout,
    stderr, the job summary, --markdown and --junit all clean; then the same with a step
    summary that cannot be written: still exit 1, with one warning line."""
    summary, output = tmp_path / "summary.md", tmp_path / "output"
    summary.write_text("earlier step\n")
    md, junit = tmp_path / "check.md", tmp_path / "check.xml"
    env = {"GITHUB_ACTIONS": "true", "GITHUB_STEP_SUMMARY": str(summary),
           "GITHUB_OUTPUT": str(output)}  # fmt: skip
    proc = run_cli(
        "check",
        crafted["damaged"],
        "--baseline",
        crafted["baseline"],
        "--markdown",
        md,
        "--junit",
        junit,
        env=env,
    )
    assert proc.returncode == 1, proc.stderr
    assert_clean(proc.stdout, "stdout")
    assert_clean(proc.stderr, "stderr")
    assert "\\x1b[2K\\x1b[1Gverdict: PASS" in proc.stdout
    annotations = [line for line in proc.stdout.splitlines() if line.startswith("::")]
    assert any("pwned" in line for line in annotations)
    for where, path in [("step summary", summary), ("--markdown", md), ("--junit", junit)]:
        assert_clean(path.read_text(encoding="utf-8"), where)
    assert summary.read_text().startswith("earlier step\n# dynaudit check")
    assert assert_tables_keep_columns(md.read_text(encoding="utf-8"), "--markdown") >= 8
    ET.fromstring(junit.read_text(encoding="utf-8"))
    assert output.read_text() == "verdict=fail\n"

    env["GITHUB_STEP_SUMMARY"] = str(tmp_path / "missing" / "summary.md")
    proc = run_cli(
        "check", crafted["damaged"], "--baseline", crafted["baseline"], "--quiet", env=env
    )
    assert proc.returncode == 1, proc.stderr
    assert_clean(proc.stderr, "stderr")
    assert proc.stderr.startswith("dynaudit: warning: could not write $GITHUB_STEP_SUMMARY")
    assert len(proc.stderr.splitlines()) == 1, proc.stderr
    assert output.read_text() == "verdict=fail\n" * 2


def test_inspect_and_measure_end_to_end(crafted: dict[str, Any], tmp_path: Path) -> None:
    """`inspect` printed raw ANSI from tensor names; `measure` of a NaN in the ESC-named
    layer: exit 1 with one clean line on stderr and a clean table."""
    proc = run_cli("inspect", crafted["clean"])
    assert proc.returncode == 0, proc.stderr
    assert_clean(proc.stdout, "inspect stdout")
    assert "\\x1b[2K\\x1b[1Gverdict: PASS" in proc.stdout
    nan = _write(tmp_path / "nan", nan=True)
    proc = run_cli("measure", nan, *FAST_FLAGS)
    assert proc.returncode == 1, proc.stderr
    assert_clean(proc.stdout, "measure stdout")
    assert_clean(proc.stderr, "measure stderr")
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "\\x1b[2K" in proc.stderr
    shutil.rmtree(nan)


def test_logged_warnings_are_one_escaped_line(crafted: dict[str, Any], tmp_path: Path) -> None:
    """A library warning quoting an untrusted string (here an unwritable cache whose path
    holds ANSI, BEL and a newline) is one escaped ``dynaudit: warning:`` line: Python's
    fallback handler printed it raw, over two lines, the second a workflow command."""
    blocked = tmp_path / "a-file\x1b[2K\x07\n::error::pwned"
    blocked.write_text("not a directory")
    env = {"DYNAUDIT_CACHE_DIR": str(blocked / "cache")}
    proc = run_cli("measure", crafted["clean"], *FAST_FLAGS, "--quiet", env=env)
    assert proc.returncode == 0, proc.stderr
    assert_clean(proc.stderr, "stderr")
    lines = proc.stderr.splitlines()
    assert lines and all(line.startswith("dynaudit: warning: ") for line in lines), lines
    assert any("a-file\\x1b[2K\\x07\\n::error::pwned" in line for line in lines)
