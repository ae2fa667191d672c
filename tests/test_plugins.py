"""A third-party family plugin installed for real (tests/plugin_dist): discovery through its
entry points, detection, ``--family``, and how broken plugins are reported."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from importlib.metadata import entry_points
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

PLUGIN_DIST = Path(__file__).parent / "plugin_dist"
DISTRIBUTION = "dynaudit-example-plugin"
FAST = ["--q-dim", "16", "--pieces", "4", "--steps", "30", "-q"]
BROKEN = {
    "broken-import": "failed to import: No module named 'dynaudit_example_plugin.missing_module'",
    "wrong-base": "is not a subclass of dynaudit.families.Family",
}


@pytest.fixture(scope="session")
def plugin_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Install tests/plugin_dist with pip into a fresh target directory; the environment
    variables a subprocess needs to see it (merged over ``os.environ`` by :func:`run`)."""
    work = tmp_path_factory.mktemp("example-plugin")
    source, target = work / "src", work / "site"
    # Build from a copy: pip builds in-tree and would leave build/ and *.egg-info behind.
    shutil.copytree(
        PLUGIN_DIST, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__")
    )
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--no-index", "--target", str(target), str(source)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (target / "dynaudit_example_plugin" / "family.py").is_file()
    pythonpath = [str(target), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {"PYTHONPATH": os.pathsep.join(pythonpath), "CI": "true"}


@pytest.fixture(scope="module")
def keras_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two Keras dense layers, kernels stored (in, out): 8 → 16 → 4."""
    gen = torch.Generator().manual_seed(0)
    tensors = {
        "dense_0/kernel": torch.randn(8, 16, generator=gen),
        "dense_0/bias": torch.randn(16, generator=gen),
        "dense_1/kernel": torch.randn(16, 4, generator=gen),
        "dense_1/bias": torch.randn(4, generator=gen),
    }
    path = tmp_path_factory.mktemp("keras") / "model.safetensors"
    save_file(tensors, str(path))
    return path


@pytest.fixture(scope="module")
def torch_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """PyTorch-named Linear weights, which no installed plugin claims."""
    gen = torch.Generator().manual_seed(1)
    tensors = {
        "0.weight": torch.randn(16, 8, generator=gen),
        "1.weight": torch.randn(4, 16, generator=gen),
    }
    path = tmp_path_factory.mktemp("torch") / "model.safetensors"
    save_file(tensors, str(path))
    return path


def run(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dynaudit", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=300,
    )


def measure(
    checkpoint: Path, out: Path, env: dict[str, str], *flags: str
) -> tuple[subprocess.CompletedProcess[str], dict[str, object]]:
    proc = run("measure", str(checkpoint), "--json", str(out), *FAST, *flags, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    report: dict[str, object] = json.loads(out.read_text())
    return proc, report


def family_and_layers(
    report: dict[str, object],
) -> tuple[dict[str, object], list[dict[str, object]]]:
    """A JSON report's ``family`` object and ``layers`` list, checked to be those types."""
    family, layers = report["family"], report["layers"]
    assert isinstance(family, dict) and isinstance(layers, list)
    return family, layers


def plugin_entries(stdout: str) -> dict[str, str]:
    """``dynaudit plugins`` output as {name: its two lines}: a name line, an indented one."""
    entries: dict[str, str] = {}
    name = ""
    for line in stdout.splitlines()[1:]:
        if line and not line.startswith(" "):
            name = line.split()[0]
            entries[name] = line
        elif name:
            entries[name] += "\n" + line
    return entries


def test_plugins_lists_the_installed_distribution_and_broken_entry_points(
    plugin_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("COLUMNS", raising=False)  # a pipe: nothing may be cut to fit
    proc = run("plugins", env=plugin_env)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "…" not in proc.stdout
    rows = plugin_entries(proc.stdout)
    assert {"dense-kernels", "generic", *BROKEN} <= set(rows), proc.stdout
    dense = rows["dense-kernels"]
    assert "dynaudit_example_plugin.family:DenseKernelsFamily" in dense
    assert f"[{DISTRIBUTION} 0.1.0]" in dense
    assert "Keras-style" in dense and "failed to load" not in dense
    assert "GenericFamily" in rows["generic"] and "failed to load" not in rows["generic"]
    for name, message in BROKEN.items():
        assert f"[{DISTRIBUTION} 0.1.0]" in rows[name]
        assert f"failed to load: family plugin {name!r}" in rows[name]
        assert message in rows[name]


def test_keras_checkpoint_is_detected_by_the_plugin(
    plugin_env: dict[str, str], keras_checkpoint: Path, tmp_path: Path
) -> None:
    _, report = measure(keras_checkpoint, tmp_path / "r.json", plugin_env)
    family, layers = family_and_layers(report)
    assert family["name"] == "dense-kernels"
    assert family["confidence"] == pytest.approx(0.9)
    measured = {x["name"]: x for x in layers if "shape" in x}
    assert list(measured) == ["dense_0/kernel", "dense_1/kernel"]
    assert [x["depth"] for x in measured.values()] == [0, 1]
    assert measured["dense_0/kernel"]["shape"] == [8, 16]
    assert measured["dense_1/kernel"]["shape"] == [16, 4]
    assert measured["dense_0/kernel"]["neurons"] == 24
    assert all(x["type"] == "dense" and x["discrepancy"] is not None for x in measured.values())
    skipped = {x["name"]: x["skipped"] for x in layers if "skipped" in x}
    assert skipped == {"dense_0/bias": "bias", "dense_1/bias": "bias"}


def test_the_installed_plugin_passes_the_conformance_kit(
    plugin_env: dict[str, str], keras_checkpoint: Path
) -> None:
    """A third-party plugin proves its conformance with one public call, as ours do."""
    code = (
        "import sys\n"
        "from dynaudit.families.testing import check_family\n"
        "plan = check_family('dense-kernels', sys.argv[1])\n"
        "print(len(plan.layers), len(plan.feeds))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(keras_checkpoint)],
        capture_output=True, text=True, env={**os.environ, **plugin_env}, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["2", "0"]  # two layers; it declares no feeds


def test_family_flag_selects_the_plugin(
    plugin_env: dict[str, str], keras_checkpoint: Path, tmp_path: Path
) -> None:
    _, report = measure(
        keras_checkpoint, tmp_path / "r.json", plugin_env, "--family", "dense-kernels"
    )
    family, _ = family_and_layers(report)
    assert family["name"] == "dense-kernels"
    assert "chosen" in str(family["detected_by"])


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_choosing_a_broken_plugin_is_a_one_line_input_error(
    plugin_env: dict[str, str], keras_checkpoint: Path, name: str
) -> None:
    proc = run("measure", str(keras_checkpoint), *FAST, "--family", name, env=plugin_env)
    assert proc.returncode == 3, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert repr(name) in lines[0] and BROKEN[name] in lines[0]


def test_detection_still_works_with_broken_plugins_installed(
    plugin_env: dict[str, str], torch_checkpoint: Path, tmp_path: Path
) -> None:
    _, report = measure(torch_checkpoint, tmp_path / "r.json", plugin_env)
    family, layers = family_and_layers(report)
    assert family["name"] == "generic"
    assert [x["name"] for x in layers if "shape" in x] == ["0.weight", "1.weight"]


def test_plugin_is_not_discovered_without_the_install(plugin_env: dict[str, str]) -> None:
    """Installed into a target directory only a subprocess sees: this process, like the
    development environment, must not find it, so the other tests prove real discovery."""
    from dynaudit.families import available_families

    assert "generic" in available_families()
    assert "dense-kernels" not in available_families()
    assert "dense-kernels" not in {ep.name for ep in entry_points(group="dynaudit.plugins")}
    assert find_spec("dynaudit_example_plugin") is None
