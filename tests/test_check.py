"""Baselines and `check` on a trained tiny LLaMA and copies derived from it: the gate end to
end (its pure policy: tests/test_gate.py)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

import dynaudit
from dynaudit.errors import BaselineError
from dynaudit.gate import decide
from dynaudit.schema import Policy
from experiments.derived import bf16_round_trip, collapse, derive, noise
from tests.cli import run_cli

# Small enough for tests, large enough for the warm refits to follow real damage: with
# q_dim 16 and 40 warm steps a rank-2 block moved 5 %, with these 20–48 % (docs/gate.md).
SETTINGS: dict[str, Any] = {"q_dim": 32, "pieces": 4, "steps": 150}
FLAGS = ["--q-dim", "32", "--pieces", "4", "--steps", "150"]


@pytest.fixture(scope="module")
def stored(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("baselines") / "tiny-llama"
    dynaudit.baseline(tiny_llama, out, **SETTINGS)
    return out


# -- baselines and checks on real checkpoints --------------------------------------------


def test_the_base_and_its_bf16_round_trip_pass(
    tiny_llama: Path, stored: Path, tmp_path: Path
) -> None:
    report = dynaudit.check(tiny_llama, stored)
    assert report.verdict.passed, report.verdict.reasons
    assert report.comparison.all.change is not None
    assert abs(report.comparison.all.change.mean) < 1e-6  # same weights, same warm refits
    bf16 = derive(tiny_llama, tmp_path / "bf16", bf16_round_trip)
    rounded = dynaudit.check(bf16, stored)
    assert rounded.verdict.passed, rounded.verdict.reasons
    assert all(x.weight_change == 0.0 for x in report.comparison.layers)
    assert all(0 < (x.weight_change or 0) < 0.005 for x in rounded.comparison.layers)


def test_a_layer_with_shuffled_rows_fails_as_replaced(
    tiny_llama: Path, stored: Path, tmp_path: Path
) -> None:
    """One matrix with its output rows shuffled: the function is wrecked but the layer's
    statistics are unchanged (its distances are the same, relabelled), so the discrepancy rules
    alone pass it; the weight sketch sees the layer ~√2 of its norm away."""
    gen = torch.Generator().manual_seed(0)

    def shuffle(name: str, v: torch.Tensor) -> torch.Tensor:
        if "layers.1.mlp.up_proj" not in name:
            return v
        return v[torch.randperm(v.shape[0], generator=gen)]

    report = dynaudit.check(derive(tiny_llama, tmp_path / "shuffled", shuffle), stored)
    assert decide(report.comparison, Policy(max_weight_change=None)).passed
    assert report.verdict.failing_layers == ["model.layers.1.mlp.up_proj.weight"]
    assert "replaced, not adapted" in report.verdict.reasons[0]
    moved = {x.name: x.weight_change for x in report.comparison.layers}
    assert 1.2 < moved.pop("model.layers.1.mlp.up_proj.weight") < 1.6  # type: ignore[operator]
    assert set(moved.values()) == {0.0}


def test_an_older_baseline_without_a_sketch_still_compares(
    tiny_llama: Path, stored: Path, tmp_path: Path
) -> None:
    """Baselines written before the weight sketch (and so before layer digests): no
    weight-change figure, no error; every layer refitted."""
    from dynaudit.tensors import sha256_file

    copy = shutil.copytree(stored, tmp_path / "old")
    manifest = json.loads((copy / "manifest.json").read_text())
    for file in (copy / "coords").iterdir():
        save_file({k: v for k, v in load_file(str(file)).items() if k != "sketch"}, str(file))
        manifest[f"coords/{file.name}"] = sha256_file(file)
    data = json.loads((copy / "baseline.json").read_text())
    for layer in [*data["layers"], *data["report"]["layers"]]:
        layer.pop("digest", None)
    (copy / "baseline.json").write_text(json.dumps(data))
    manifest["baseline.json"] = sha256_file(copy / "baseline.json")
    (copy / "manifest.json").write_text(json.dumps(manifest))
    report = dynaudit.check(tiny_llama, copy)
    assert report.verdict.passed
    assert all(x.weight_change is None for x in report.comparison.layers)
    assert report.comparison.unchanged == [] and report.comparison.refits == 29


def test_a_rank_collapsed_block_fails_naming_layers_and_groups(
    tiny_llama: Path, stored: Path, tmp_path: Path
) -> None:
    damaged = derive(tiny_llama, tmp_path / "collapsed", collapse(2, "layers.1."))
    out = tmp_path / "r.json"
    summary, output = tmp_path / "summary.md", tmp_path / "output"
    github = {"GITHUB_ACTIONS": "true", "GITHUB_STEP_SUMMARY": str(summary),
              "GITHUB_OUTPUT": str(output)}  # fmt: skip
    reports = ["--markdown", str(tmp_path / "r.md"), "--junit", str(tmp_path / "r.xml")]
    check = ["check", str(damaged), "--baseline", str(stored), "--json", str(out), *reports]
    proc = run_cli(*check, env=github)
    assert proc.returncode == 1, proc.stderr
    assert output.read_text() == "verdict=fail\n"
    assert summary.read_text() == (tmp_path / "r.md").read_text() + "\n"
    annotations = [line for line in proc.stdout.splitlines() if line.startswith("::error")]
    assert any("bottom third" in line for line in annotations)
    assert "<failure" in (tmp_path / "r.xml").read_text()
    report = dynaudit.CheckReport.model_validate_json(out.read_text())
    assert "bottom" in report.verdict.failing_groups
    assert any("layers.1." in name for name in report.verdict.failing_layers)
    assert not any("layers.3." in name for name in report.verdict.failing_layers)
    assert report.comparison.groups["bottom"].change.mean < -0.03  # type: ignore[union-attr]
    assert "capacity loss" in proc.stdout and "❌ fail" in (tmp_path / "r.md").read_text()


def test_heavy_noise_fails_as_damage(tiny_llama: Path, stored: Path, tmp_path: Path) -> None:
    report = dynaudit.check(derive(tiny_llama, tmp_path / "noisy", noise(1.0)), stored)
    assert not report.verdict.passed
    assert any(reason.startswith("damage:") for reason in report.verdict.reasons)


def test_noise_a_quarter_of_the_weights_fails_as_noise(
    tiny_llama: Path, stored: Path, tmp_path: Path
) -> None:
    """Noise at 25 % of each matrix's std: at these fit settings its layer statistics stay
    under the limits (the quick calibration passed it), but the change is as unstructured as
    noise and a quarter of the weights' norm."""
    report = dynaudit.check(derive(tiny_llama, tmp_path / "noisy", noise(0.25)), stored)
    assert decide(report.comparison, Policy(max_noise_change=None)).passed
    assert not report.verdict.passed
    assert all("like random noise" in reason for reason in report.verdict.reasons)
    likeness = [x.noise_likeness for x in report.comparison.layers if x.noise_likeness]
    assert len(likeness) == len(report.comparison.layers) and min(likeness) > 0.8


def test_weight_policy_flags_reach_the_gate(tiny_llama: Path, stored: Path, tmp_path: Path) -> None:
    """A bf16 round trip moves every layer by ~0.2 %, like noise: it passes by default, and
    fails when the flags set the weight limits below that."""
    bf16 = derive(tiny_llama, tmp_path / "bf16", bf16_round_trip)
    proc = run_cli("check", str(bf16), "--baseline", str(stored), "--max-weight-change", "0.01")
    assert proc.returncode == 1 and "replaced, not adapted" in proc.stdout, proc.stderr
    proc = run_cli("check", str(bf16), "--baseline", str(stored), "--max-noise-change", "0.01")
    assert proc.returncode == 1 and "like random noise" in proc.stdout, proc.stderr


def test_nan_weights_exit_1(tiny_llama: Path, stored: Path, tmp_path: Path) -> None:
    def poison(name: str, v: torch.Tensor) -> torch.Tensor:
        if "layers.2.mlp.up_proj" in name:
            v = v.clone()
            v[0, 0] = float("nan")
        return v

    proc = run_cli(
        "check", str(derive(tiny_llama, tmp_path / "nan", poison)), "--baseline", str(stored)
    )
    assert proc.returncode == 1
    assert "layers.2.mlp.up_proj" in proc.stderr and "non-finite" in proc.stderr


@pytest.mark.slow
def test_real_fine_tunes_from_the_cli(tiny_llama: Path, stored: Path, tmp_path: Path) -> None:
    """Acceptance (b) and (c) with real fine-tunes: a gentle one is decided by the policy with
    its deltas shown — from seed 0 alone, far from every threshold, and with their spread
    over the K seeds under --all-seeds; a catastrophic one exits 1 naming layers and groups."""
    from experiments.calibrate_gate import FINETUNE_MODULES
    from tests import zoo

    gentle, wrecked = tmp_path / "gentle", tmp_path / "catastrophic"
    zoo.finetune_tiny_llama(tiny_llama, gentle, modules=FINETUNE_MODULES, steps=30, lr=3e-4)
    zoo.finetune_tiny_llama(
        tiny_llama, wrecked, modules=FINETUNE_MODULES, steps=30, lr=3e-2, clip=None
    )
    out = tmp_path / "gentle.json"
    proc = run_cli("check", str(gentle), "--baseline", str(stored), "--json", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = dynaudit.CheckReport.model_validate_json(out.read_text())
    change = report.comparison.all.change
    assert change is not None and change.seeds == 1 and report.comparison.refits == 29
    assert 0 < abs(change.mean) < 0.02  # it moved, a little
    assert f"{change.mean * 100:+.2f}% (1 seed)" in proc.stdout
    proc = run_cli(
        "check", str(gentle), "--baseline", str(stored), "--json", str(out), "--all-seeds"
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = dynaudit.CheckReport.model_validate_json(out.read_text())
    change = report.comparison.all.change
    assert change is not None and change.seeds == 3 and change.std > 0
    assert report.comparison.refits == report.comparison.refits_full == 87
    assert f"{change.mean * 100:+.2f}% ± {change.std * 100:.2f}%" in proc.stdout
    proc = run_cli("check", str(wrecked), "--baseline", str(stored))
    assert proc.returncode == 1
    assert "damage: model.layers." in proc.stdout and "all layers" in proc.stdout


def _rewrite(baseline_dir: Path, change: Any) -> None:
    """Edit baseline.json and re-sign the manifest, as a different dynaudit would have written."""
    from dynaudit.tensors import sha256_file

    data = json.loads((baseline_dir / "baseline.json").read_text())
    change(data)
    (baseline_dir / "baseline.json").write_text(json.dumps(data))
    manifest = json.loads((baseline_dir / "manifest.json").read_text())
    manifest["baseline.json"] = sha256_file(baseline_dir / "baseline.json")
    (baseline_dir / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    ("case", "needle"),
    [
        ("tampered", "sha256 differs"),
        ("protocol", "protocol v99"),
        ("settings", "settings differ"),
        ("architecture", "architecture differs"),
        ("family", "architecture differs from the baseline"),  # a ViT vs a LLaMA baseline
    ],
)
def test_unusable_baselines_are_input_errors(
    tiny_llama: Path, stored: Path, tmp_path: Path, case: str, needle: str
) -> None:
    copy = shutil.copytree(stored, tmp_path / "baseline")
    source = tiny_llama
    extra: list[str] = []
    if case == "tampered":
        coords = next((copy / "coords").iterdir())
        data = bytearray(coords.read_bytes())
        data[-1] ^= 0x01
        coords.write_bytes(bytes(data))
    elif case == "protocol":
        _rewrite(copy, lambda d: d.update(protocol_version=99))
    elif case == "settings":
        extra = ["--q-dim", "64"]
    elif case == "family":
        from tests import producers

        source = producers.vit_hf(tmp_path / "vit")
    else:
        from tests import producers

        source = producers.llama(tmp_path / "other", dtype=torch.float32)
    if extra:
        with pytest.raises(BaselineError, match=needle):
            dynaudit.check(source, copy, q_dim=64)
        return
    proc = run_cli("check", str(source), "--baseline", str(copy))
    assert proc.returncode == 3, proc.stderr
    assert needle in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_a_baseline_is_never_overwritten(tiny_llama: Path, stored: Path) -> None:
    before = (stored / "manifest.json").read_text()
    proc = run_cli("baseline", str(tiny_llama), "--out", str(stored), *FLAGS)
    assert proc.returncode == 2 and "never overwritten" in proc.stderr
    assert (stored / "manifest.json").read_text() == before
    assert not list(stored.parent.glob(".*tmp-*"))


def test_baselines_default_to_three_seeds_from_the_cli(tiny_llama: Path, tmp_path: Path) -> None:
    """The CLI passes ``seeds=None`` when --seeds is left out: that once gave K = 1."""
    out = tmp_path / "default-k"
    proc = run_cli("baseline", str(tiny_llama), "--out", str(out), *FLAGS, "--steps", "20")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "baseline.json").read_text())["seeds"] == 3
    report = tmp_path / "compare.json"
    fit = [*FLAGS, "--steps", "20"]
    proc = run_cli("compare", str(tiny_llama), str(tiny_llama), *fit, "--json", str(report), "-q")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(report.read_text())["baseline"]["seeds"] == 3


def figures(report: dynaudit.CheckReport) -> list[Any]:
    """What a comparison measured, without timings."""
    return [(x.name, x.change, x.displacement) for x in report.comparison.layers]


def test_the_public_compare_is_the_function() -> None:
    """Regression: a module named dynaudit.compare replaced the function once imported."""
    import dynaudit.gate  # imports every gate module

    assert callable(dynaudit.compare) and dynaudit.compare.__module__ == "dynaudit.api"


def test_a_checkpoint_baseline_is_measured_once_and_kept_in_the_cache(
    tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import dynaudit.api

    made: list[Path] = []  # every baseline directory measured, in order
    real = dynaudit.api.write_baseline

    def counting(checkpoint: Any, resolved: Any, target: Path, *args: Any, **kwargs: Any) -> Any:
        made.append(target)
        return real(checkpoint, resolved, target, *args, **kwargs)

    monkeypatch.setattr(dynaudit.api, "write_baseline", counting)
    bf16 = derive(tiny_llama, tmp_path / "bf16", bf16_round_trip)
    first = dynaudit.compare(tiny_llama, bf16, seeds=2, **SETTINGS)
    second = dynaudit.compare(tiny_llama, bf16, seeds=2, **SETTINGS)
    cache = Path(os.environ["DYNAUDIT_CACHE_DIR"])
    (entry,) = made
    assert entry.parent.parent == cache / "baselines"
    assert figures(second) == figures(first)
    assert second.baseline.created_at == first.baseline.created_at and not second.baseline.stored
    # a damaged entry is remade, not trusted
    coords = next((entry / "coords").iterdir())
    data = bytearray(coords.read_bytes())
    data[-1] ^= 0x01
    coords.write_bytes(bytes(data))
    third = dynaudit.compare(tiny_llama, bf16, seeds=2, **SETTINGS)
    assert made == [entry, entry] and figures(third) == figures(first)
    dynaudit.compare(tiny_llama, bf16, seeds=2, cache=False, **SETTINGS)
    assert len(made) == 3 and cache not in made[-1].parents
    assert len(list((cache / "baselines").glob("*/*"))) == 1


@pytest.mark.parametrize("signal_name", ["SIGINT", "SIGTERM"])
def test_an_interrupted_baseline_leaves_nothing(
    tiny_llama: Path, tmp_path: Path, signal_name: str
) -> None:
    """Ctrl-C, or SIGTERM (a cancelled CI job: it once killed the process and left the staging
    folder), while the layers are being fitted: exit 130, no baseline, no staging folder."""
    import signal
    import time

    out = tmp_path / "interrupted"
    proc = subprocess.Popen(
        [sys.executable, "-m", "dynaudit", "baseline", str(tiny_llama), "--out", str(out),
         "--q-dim", "64", "--pieces", "4", "--steps", "4000"],  # still fitting at the signal
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "CI": "true"},
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not list(tmp_path.glob(".interrupted.tmp-*/coords")):
            assert proc.poll() is None and time.monotonic() < deadline, "no staging folder"
            time.sleep(0.1)
        time.sleep(2)  # into the fits
        proc.send_signal(getattr(signal, signal_name))
        _, stderr = proc.communicate(timeout=120)  # a loaded CI machine is slow to tear down
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1
    assert not out.exists() and not list(tmp_path.glob(".interrupted*"))


def test_an_adapter_without_baseline_finds_its_base(tmp_path: Path) -> None:
    from tests import producers
    from tests.test_adapters import make_adapter

    base = producers.llama(tmp_path / "base", dtype=torch.float32)
    adapter, _ = make_adapter(base, tmp_path)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(base)
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    report = dynaudit.check(adapter, **{k: v for k, v in SETTINGS.items()})
    assert report.baseline.resolved_from == "the adapter's base_model_name_or_path"
    assert report.baseline.ref == str(base) and not report.baseline.stored
    assert report.comparison.all.change is not None


def test_no_baseline_anywhere_is_a_usage_error(tiny_llama: Path, tmp_path: Path) -> None:
    proc = run_cli("check", str(tiny_llama), cwd=tmp_path)
    assert proc.returncode == 2 and "--baseline" in proc.stderr


@pytest.mark.slow
def test_a_bf16_round_trip_passes_against_ten_seeds(tiny_llama: Path, tmp_path: Path) -> None:
    """Acceptance (a): no false alarm against baselines of 10 different seeds. (The base
    itself gives exactly zero change against any baseline of its own — the warm refit from a
    cold fit on the same weights is that cold fit's null refit — so the round trip, which
    moves every weight a little, is the case that can fail.)"""
    rounded = derive(tiny_llama, tmp_path / "bf16", bf16_round_trip)
    for seed in range(10):
        out = tmp_path / f"seed{seed}"
        dynaudit.baseline(tiny_llama, out, seed=100 + seed, seeds=1, **SETTINGS)
        report = dynaudit.check(rounded, out)
        assert report.verdict.passed, (seed, report.verdict.reasons)
        assert report.comparison.all.change is not None
        assert abs(report.comparison.all.change.mean) < 0.005
