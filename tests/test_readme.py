"""The README's commands and code work as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), flags=re.DOTALL)


@pytest.mark.slow
def test_python_example_runs_on_a_real_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from dynaudit.demo import build_demo_checkpoint

    build_demo_checkpoint(tmp_path / "model")
    (code,) = _blocks("python")
    exec(code.replace("path/to/model", str(tmp_path / "model")), {})
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 1 + 3  # the summary line, then one line per layer


def test_quickstart_commands_exist() -> None:
    (quickstart, *_rest) = _blocks("bash")
    assert "bash scripts/dev.sh demo" in quickstart and "bash scripts/dev.sh test" in quickstart
    ci = (README.parent / ".ci" / "run").read_text()
    assert "scripts/dev.sh test" in ci


def test_the_family_table_lists_every_installed_first_party_family() -> None:
    """README's family table and `dynaudit plugins` name the same first-party families."""
    from dynaudit.families import available_families

    table = re.search(
        r"\| family \| checkpoints \| layer types \|\n(.*?)\n\n", README.read_text(), re.S
    )
    assert table is not None
    listed = re.findall(r"^\| `([\w-]+)` \|", table[1], flags=re.M)
    ours = [
        n for n, origin in available_families().items() if origin.startswith("dynaudit_plugins")
    ]
    assert sorted(listed) == sorted(ours)
