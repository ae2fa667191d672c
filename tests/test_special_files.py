"""Identify before opening: a FIFO, a device, a dangling link or a directory where dynaudit
expects a regular file (weights, config, index, model card, pickle) is exit 3 in one line, at
once; opening a FIFO would block until a writer comes. Also: header strings that are not valid
Unicode (a lone UTF-16 surrogate escaped in the JSON) are exit 3, not a crash.

Each case runs the real CLI in a subprocess with a timeout, so a hang fails the test instead
of blocking the suite; the subprocess times the command itself (imports excluded: on a loaded
machine they alone take seconds)."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

pytestmark = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs (POSIX)")

FAST = ["--q-dim", "16", "--pieces", "4", "--steps", "30"]
RUNNER = """
import sys, time
import torch, dynaudit.cli.app  # imports first: the clock is for the command alone
from dynaudit.cli import main
start = time.perf_counter()
code = main(sys.argv[1:])
sys.stderr.write(f"ELAPSED {time.perf_counter() - start:.3f}\\n")
sys.exit(code)
"""


def timed(*args: str | Path, cwd: Path | None = None) -> tuple[int, list[str], float]:
    """Run the CLI; returns (exit code, stderr lines without the timing, seconds)."""
    proc = subprocess.run(
        [sys.executable, "-c", RUNNER, *map(str, args)],
        capture_output=True, text=True, timeout=120, cwd=cwd,
        env={**os.environ, "CI": "true"},
    )  # fmt: skip
    lines = proc.stderr.strip().splitlines()
    seconds = float(lines[-1].split()[1]) if lines and lines[-1].startswith("ELAPSED") else 1e9
    return proc.returncode, [line for line in lines if not line.startswith("ELAPSED")], seconds


def refused(*args: str | Path, cwd: Path | None = None, says: str = "") -> str:
    code, lines, seconds = timed(*args, cwd=cwd)
    assert code == 3, lines
    assert len(lines) == 1, lines
    assert seconds < 2, seconds
    assert "Traceback" not in lines[0] and says in lines[0], lines
    return lines[0]


def _weights(folder: Path, name: str = "model.safetensors") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    save_file({"fc.weight": torch.randn(8, 6), "out.weight": torch.randn(4, 8)}, folder / name)
    return folder


def _fifo(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(path)
    return path


# -- weights ----------------------------------------------------------------------------


def test_a_fifo_named_model_safetensors(tmp_path: Path) -> None:
    _fifo(tmp_path / "ckpt" / "model.safetensors")
    refused("measure", tmp_path / "ckpt", *FAST, says="FIFO")


def test_a_fifo_beside_the_weights_is_refused_not_skipped(tmp_path: Path) -> None:
    """The fingerprint covers every weight file present, so an extra one is opened too."""
    _fifo(_weights(tmp_path / "ckpt") / "extra.safetensors")
    refused("measure", tmp_path / "ckpt", *FAST, says="extra.safetensors")


def test_a_fifo_shard_named_by_the_index(tmp_path: Path) -> None:
    folder = _weights(tmp_path / "ckpt", "model-00001-of-00002.safetensors")
    _fifo(folder / "model-00002-of-00002.safetensors")
    index = {"weight_map": {"fc.weight": "model-00001-of-00002.safetensors",
                            "out.weight": "model-00001-of-00002.safetensors",
                            "x.weight": "model-00002-of-00002.safetensors"}}  # fmt: skip
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    refused("measure", folder, *FAST, says="FIFO")


def test_a_symlink_to_a_fifo(tmp_path: Path) -> None:
    fifo = _fifo(tmp_path / "pipe")
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "model.safetensors").symlink_to(fifo)
    refused("measure", tmp_path / "ckpt", *FAST, says="FIFO")
    refused("inspect", tmp_path / "ckpt", says="FIFO")


def test_a_dangling_symlink_is_named(tmp_path: Path) -> None:
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "model.safetensors").symlink_to(tmp_path / "gone")
    refused("measure", tmp_path / "ckpt", *FAST, says="link to nothing")


def test_a_directory_named_like_a_weight_file(tmp_path: Path) -> None:
    (_weights(tmp_path / "ckpt") / "extra.safetensors").mkdir()
    refused("measure", tmp_path / "ckpt", *FAST, says="directory")


@pytest.mark.parametrize("kind", ["fifo", "fifo-link", "dev-zero"])
def test_a_source_that_is_neither_a_file_nor_a_directory(tmp_path: Path, kind: str) -> None:
    if kind == "fifo":
        source = _fifo(tmp_path / "model.safetensors")
    elif kind == "fifo-link":
        source = tmp_path / "model.safetensors"
        source.symlink_to(_fifo(tmp_path / "pipe"))
    else:
        source = Path("/dev/zero")
        if not source.exists():
            pytest.skip("no /dev/zero")
    refused("measure", source, *FAST, says="not a .safetensors file or a directory")
    refused("inspect", source)


def test_a_fifo_pickle_with_allow_pickle(tmp_path: Path) -> None:
    _fifo(tmp_path / "ckpt" / "pytorch_model.bin")
    refused("measure", tmp_path / "ckpt", "--allow-pickle", *FAST, says="FIFO")


# -- side files -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "side", ["config.json", "model.safetensors.index.json", "adapter_config.json", "README.md"]
)
def test_a_fifo_side_file(tmp_path: Path, side: str) -> None:
    _fifo(_weights(tmp_path / "ckpt") / side)
    refused("measure", tmp_path / "ckpt", *FAST, says=side)


def test_a_fifo_config_beside_a_single_file_source(tmp_path: Path) -> None:
    _fifo(_weights(tmp_path / "ckpt") / "config.json")
    refused("measure", tmp_path / "ckpt" / "model.safetensors", *FAST, says="config.json")


def test_check_refuses_a_fifo_model_card_at_once(tmp_path: Path) -> None:
    """Without --baseline, check reads the model card for its base_model."""
    _fifo(_weights(tmp_path / "ckpt") / "README.md")
    refused("check", tmp_path / "ckpt", says="README.md", cwd=tmp_path)


def test_a_model_card_naming_a_directory_that_holds_a_fifo(tmp_path: Path) -> None:
    """The card's base_model is measured as the baseline: its FIFO is refused, not read."""
    _fifo(tmp_path / "base" / "model.safetensors")
    folder = _weights(tmp_path / "ckpt")
    (folder / "README.md").write_text(f"---\nbase_model: {tmp_path / 'base'}\n---\n# tuned\n")
    refused("check", folder, cwd=tmp_path, says="FIFO")


def test_a_fifo_candidate_is_refused_before_the_baseline_is_measured(tmp_path: Path) -> None:
    base = _weights(tmp_path / "base")
    _fifo(tmp_path / "ckpt" / "model.safetensors")
    refused("check", tmp_path / "ckpt", "--baseline", base, says="FIFO")


# -- lone surrogates --------------------------------------------------------------------


def _raw_safetensors(path: Path, header: dict[str, object], data: bytes) -> Path:
    """A safetensors file with a header written by hand, so it can hold escapes that no
    producer would write (``json.dumps`` keeps ``\\ud800`` escaped)."""
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


@pytest.mark.parametrize(
    "header",
    [
        {"fc.\ud800.weight": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}},
        {"fc.weight": {"dtype": "F\udc00", "shape": [2, 2], "data_offsets": [0, 16]}},
        {
            "__metadata__": {"format": "pt", "note\ud83d": "x"},
            "fc.weight": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
        },
    ],
    ids=["tensor-name", "dtype", "metadata"],
)
def test_a_lone_surrogate_in_the_header_is_exit_3(
    tmp_path: Path, header: dict[str, object]
) -> None:
    path = _raw_safetensors(tmp_path / "ckpt" / "model.safetensors", header, bytes(16))
    for command in ("measure", "inspect"):
        refused(command, path.parent, *(FAST if command == "measure" else []), says="surrogate")


def test_a_lone_surrogate_in_the_index_or_config_is_exit_3(tmp_path: Path) -> None:
    folder = _weights(tmp_path / "index", "model-00001-of-00001.safetensors")
    index = {
        "weight_map": {"fc.weight": "model-00001-of-00001.safetensors", "out.weight": "\ud800"}
    }
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    refused("measure", folder, *FAST, says="surrogate")
    folder = _weights(tmp_path / "config")
    (folder / "config.json").write_text(json.dumps({"model_type": "\udfff"}))
    refused("measure", folder, *FAST, says="surrogate")
