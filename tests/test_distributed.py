"""Layers sharded over a torchrun job: the same report as one process (SPEC §4.6)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dynaudit.distributed import Ranks, assign
from tests.cli import run_cli
from tests.conftest import small_settings

SETTINGS = ["--q-dim", "32", "--pieces", "4", "--steps", "100", "--seeds", "2", "--no-cache"]


def test_assign_gives_each_rank_a_fair_and_fixed_share() -> None:
    costs = [8.0, 1.0, 1.0, 4.0, 4.0, 2.0]
    owners = assign(costs, 2)
    assert owners == assign(costs, 2)  # every rank computes the same assignment
    loads = [sum(c for c, o in zip(costs, owners, strict=True) if o == r) for r in (0, 1)]
    assert sorted(loads) == [10.0, 10.0]
    assert assign(costs, 1) == [0] * len(costs)
    assert sorted(assign([1.0, 1.0], 4)) == [0, 1]  # more ranks than batches: some idle


def test_each_rank_fits_its_own_share(tiny_llama: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a process group: each rank's share is recorded as it is exchanged; the shares
    are disjoint, cover every layer, and the merged report equals one process's."""
    import dynaudit
    import dynaudit.api

    whole = dynaudit.measure(tiny_llama, cache=False, **small_settings())
    everything = {layer.name: layer for layer in whole.measured}
    shares: dict[int, set[str]] = {}

    class Recorded(Ranks):
        def from_main(self, value: object) -> object:
            return value

        def gather(self, value: object) -> list[object]:
            shares[self.rank] = set(value[0])  # type: ignore[index]
            return [value, (everything, [])]

    for rank in (0, 1):
        monkeypatch.setattr(dynaudit.api, "current", lambda rank=rank: Recorded(rank, 2))
        merged = dynaudit.measure(tiny_llama, cache=False, **small_settings())
        assert [x.discrepancy for x in merged.measured] == [x.discrepancy for x in whole.measured]
    assert shares[0] and shares[1] and not shares[0] & shares[1]
    assert shares[0] | shares[1] == set(everything)


def _numbers(path: Path) -> dict[str, tuple[float, float, float]]:
    report = json.loads(path.read_text())
    return {
        layer["name"]: (layer["discrepancy"], layer["mean_distance"], layer["fidelity"])
        for layer in report["layers"]
        if "discrepancy" in layer and layer["discrepancy"] is not None
    }


@pytest.mark.slow
def test_two_ranks_give_the_single_process_report(tiny_llama: Path, tmp_path: Path) -> None:
    """``torchrun --nproc-per-node 2 -m dynaudit measure`` on CPU (gloo): one report, from
    rank 0, with every layer's numbers within 1e-5 of a one-process run on one thread."""
    env = {**os.environ, "CI": "true", "OMP_NUM_THREADS": "1"}
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    single = run_cli("measure", tiny_llama, "--json", one, "--threads", "1", "--quiet", *SETTINGS)
    assert single.returncode == 0, single.stderr
    sharded = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "dynaudit", "measure", str(tiny_llama), "--json", str(two), *SETTINGS],
        capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    assert "Traceback" not in sharded.stderr
    expected, got = _numbers(one), _numbers(two)
    assert got.keys() == expected.keys() and len(got) == 29
    for name, values in expected.items():
        for want, have in zip(values, got[name], strict=True):
            assert have == pytest.approx(want, rel=1e-5), name
    # one report, printed once: rank 1 says nothing on stdout
    assert sharded.stdout.count("summary (means over layers)") == 1


def _changes(path: Path) -> tuple[str, dict[str, float]]:
    report = json.loads(path.read_text())
    layers = report["comparison"]["layers"]
    return report["verdict"]["verdict"], {
        x["name"]: x["change"]["mean"] for x in layers if x["change"] is not None
    }


def _torchrun(*argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CI": "true", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "dynaudit", *argv],
        capture_output=True, text=True, timeout=600, env=env, cwd=cwd,
    )  # fmt: skip


def _baseline_numbers(path: Path) -> dict[str, list[float]]:
    data = json.loads((path / "baseline.json").read_text())
    return {x["name"]: x["cold_mean_distance"] + x["null_mean_distance"] for x in data["layers"]}


@pytest.mark.slow
def test_two_ranks_make_and_check_baselines_like_one_process(
    tiny_llama: Path, tmp_path: Path
) -> None:
    """``torchrun … baseline`` and ``torchrun … check --baseline DIR``: each rank fits its
    share of the layers, rank 0 writes one baseline and one report, equal to one process's
    within 1e-5."""
    import dynaudit
    from experiments.derived import derive

    flags = ["--q-dim", "16", "--pieces", "4", "--steps", "60", "--seeds", "2"]
    one_dir, two_dir = tmp_path / "one", tmp_path / "two"
    dynaudit.baseline(tiny_llama, one_dir, **small_settings(seeds=2, threads=1))
    made = _torchrun("baseline", str(tiny_llama), "--out", str(two_dir), *flags, cwd=tmp_path)
    assert made.returncode == 0, made.stderr[-3000:]
    assert made.stdout.count("baseline of") == 1  # rank 0 alone reports
    assert not list(tmp_path.glob(".two.tmp-*"))  # the staging directory was renamed
    expected, got = _baseline_numbers(one_dir), _baseline_numbers(two_dir)
    assert got.keys() == expected.keys() and len(got) == 29
    for name, values in expected.items():
        assert got[name] == pytest.approx(values, rel=1e-5), name
    assert sorted(p.name for p in (one_dir / "coords").iterdir()) == sorted(
        p.name for p in (two_dir / "coords").iterdir()
    )

    gen = torch.Generator().manual_seed(0)
    noisy = derive(tiny_llama, tmp_path / "noisy", lambda _, v: v + 0.2 * v.std() * torch.randn(
        v.shape, generator=gen) if v.dim() == 2 else v)  # fmt: skip
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    single = run_cli("check", noisy, "--baseline", one_dir, "--json", one)
    assert single.returncode in (0, 1), single.stderr
    sharded = _torchrun("check", str(noisy), "--baseline", str(two_dir), "--json", str(two),
                        cwd=tmp_path)  # fmt: skip
    assert sharded.returncode == single.returncode, sharded.stderr[-3000:]
    (verdict, expected_changes), (verdict2, changes) = _changes(one), _changes(two)
    assert verdict == verdict2
    assert changes.keys() == expected_changes.keys() and len(changes) == 29
    assert any(abs(v) > 1e-3 for v in changes.values())
    for name, want in expected_changes.items():
        assert changes[name] == pytest.approx(want, rel=1e-5, abs=1e-9), name
    assert sharded.stdout.count("verdict") == single.stdout.count("verdict")
    # against a checkpoint, whose baseline would be measured once per rank: refused
    refused = _torchrun("check", str(tiny_llama), "--baseline", str(tiny_llama), cwd=tmp_path)
    assert refused.returncode != 0
    assert "check against a checkpoint (its baseline is measured first) is not sharded" in (
        refused.stderr
    )


def test_a_baseline_into_mlflow_alone_refuses_to_run_per_rank(
    tiny_llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without --out each rank would stage into its own temporary directory."""
    import dynaudit
    from dynaudit.errors import UsageError

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UsageError, match="baseline --mlflow without --out is not sharded"):
        dynaudit.baseline(tiny_llama, None, mlflow=True)


def test_a_world_size_without_torchrun_is_a_usage_error(tiny_llama: Path) -> None:
    proc = run_cli("measure", tiny_llama, env={"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": None})
    assert proc.returncode == 2, proc.stderr
    assert "torchrun rendezvous failed" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
