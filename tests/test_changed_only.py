"""Checks pay for what changed (issue 19, item 4): layers bit-equal to the baseline's are not
refitted, and seeds beyond the first run only where a verdict is near a threshold."""

from __future__ import annotations

import json
import pickle
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch

import dynaudit
from dynaudit.cli import main
from dynaudit.distributed import Ranks
from dynaudit.engine.measure import layer_digest
from dynaudit.gate import layer_undecided, scope_undecided
from dynaudit.reports.check import render_check_markdown
from dynaudit.schema import CheckReport, Policy
from experiments.derived import Change, collapse, derive, noise
from tests import producers

# Digests alone: the smallest fits (the numbers of a refit do not matter here).
TINY: dict[str, Any] = {"q_dim": 8, "pieces": 2, "steps": 20, "warm_steps": 10}
# Sequential seeds: the gate tests' settings. At TINY the seeds of this (initialised, not
# trained) model spread by 1–13 %, so every margin reaches a threshold and all seeds run.
GATE: dict[str, Any] = {"q_dim": 32, "pieces": 4, "steps": 150}
LAYERS = 29  # 4 blocks × 7 projections + lm_head
Q_V = [f"model.layers.{i}.self_attn.{p}_proj.weight" for i in range(4) for p in ("q", "v")]


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return producers.llama(tmp_path_factory.mktemp("changed") / "base", dtype=torch.float32)


@pytest.fixture(scope="module")
def tiny_baseline(base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("baselines") / "tiny"
    dynaudit.baseline(base, out, **TINY)
    return out


@pytest.fixture(scope="module")
def gate_baseline(base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("baselines") / "gate"
    dynaudit.baseline(base, out, **GATE)
    return out


@pytest.fixture(scope="module")
def lora(base: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A gentle PEFT LoRA (r 4) on q_proj and v_proj: the adapter and its merged model."""
    out = tmp_path_factory.mktemp("lora")
    producers.peft_lora(base, out / "adapter", alpha=8, b_std=0.002, merged=out / "merged")
    return out / "adapter", out / "merged"


def edit(only: dict[str, Callable[[torch.Tensor], torch.Tensor]]) -> Change:
    """A change of the tensors whose names contain a key of ``only``; the rest as they are."""

    def apply(name: str, tensor: torch.Tensor) -> torch.Tensor:
        for part, change in only.items():
            if part in name:
                return change(tensor)
        return tensor

    return apply


def changed(report: CheckReport) -> list[str]:
    unchanged = set(report.comparison.unchanged or [])
    return [x.name for x in report.comparison.layers if x.name not in unchanged]


def same_verdict(a: CheckReport, b: CheckReport) -> None:
    assert a.verdict.verdict == b.verdict.verdict, (a.verdict.reasons, b.verdict.reasons)
    assert a.verdict.failing_layers == b.verdict.failing_layers
    assert a.verdict.failing_groups == b.verdict.failing_groups


# -- digests ------------------------------------------------------------------------------


def test_the_digest_is_of_the_float32_values_and_their_shape() -> None:
    torch.manual_seed(0)
    w = torch.randn(2, 6, 4)
    assert layer_digest(w) == layer_digest(w.clone())
    assert layer_digest(w.mT.contiguous().mT) == layer_digest(w)  # layout: not hashed
    assert layer_digest(w.to(torch.bfloat16).float()) != layer_digest(w)  # values: hashed
    assert layer_digest(w.reshape(1, 12, 4)) != layer_digest(w)  # the shape too
    zeros = torch.zeros(1, 2, 2)
    assert layer_digest(zeros) != layer_digest(-zeros)  # bit-equal, not numerically equal
    assert len(layer_digest(w)) == 64


def test_the_base_against_itself_refits_nothing(
    base: Path, tiny_baseline: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = json.loads((tiny_baseline / "baseline.json").read_text())
    assert all(len(x["digest"]) == 64 for x in data["layers"])
    report = dynaudit.check(base, tiny_baseline)
    comparison = report.comparison
    assert report.verdict.passed
    assert comparison.refits == 0 and comparison.refits_full == 3 * LAYERS
    assert comparison.unchanged == [x.name for x in comparison.layers]
    assert len(comparison.layers) == LAYERS
    fidelity = {x.name: x.fidelity for x in dynaudit.measure(base, cache=False, **TINY).measured}
    for layer in comparison.layers:
        assert layer.unchanged and layer.change is not None
        assert (layer.change.mean, layer.change.std, layer.change.seeds) == (0.0, 0.0, 3)
        assert layer.mean_distance == layer.baseline_mean_distance
        assert layer.displacement == 0.0 and layer.weight_change == 0.0
        assert layer.fidelity == fidelity[layer.name]  # the baseline's cold fit's
    assert comparison.all.change is not None and comparison.all.change.mean == 0.0
    assert "29 layers unchanged" in render_check_markdown(report)
    capsys.readouterr()
    code = main(["check", str(base), "--baseline", str(tiny_baseline), "--json",
                 str(tmp_path / "r.json")])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    assert "refits: 29 layers unchanged" in " ".join(out.split())
    assert "0 warm refits run of 87" in " ".join(out.split())
    assert json.loads((tmp_path / "r.json").read_text())["comparison"]["refits"] == 0


def test_two_edited_tensors_are_the_only_layers_refitted(
    base: Path, tiny_baseline: Path, tmp_path: Path
) -> None:
    edited = derive(base, tmp_path / "edited", edit({
        "layers.0.mlp.up_proj": lambda w: w * 1.01,
        "layers.2.self_attn.k_proj": lambda w: w + 1e-3,
    }))  # fmt: skip
    report = dynaudit.check(edited, tiny_baseline, all_seeds=True)
    assert report.comparison.refits == 2 * 3
    assert changed(report) == [
        "model.layers.0.mlp.up_proj.weight", "model.layers.2.self_attn.k_proj.weight"
    ]  # fmt: skip
    assert all(x.unchanged is False for x in report.comparison.layers if x.name in changed(report))


def test_an_adapter_refits_only_the_layers_it_touches(
    base: Path, gate_baseline: Path, lora: tuple[Path, Path]
) -> None:
    """A q/v LoRA, as its adapter (merged by dynaudit) or merged by PEFT: 8 of 29 layers
    differ from the base, each far from every threshold: one refit each."""
    adapter, merged = lora
    for source, base_flag in ((merged, None), (adapter, base)):
        report = dynaudit.check(source, gate_baseline, base=base_flag)
        assert changed(report) == Q_V
        assert report.comparison.refits == len(Q_V)
        assert report.verdict.passed, report.verdict.reasons
        full = dynaudit.check(source, gate_baseline, base=base_flag, all_seeds=True)
        assert full.comparison.refits == 3 * len(Q_V) and full.comparison.seed_rule == "all"
        same_verdict(report, full)


def test_bf16_and_float32_copies_of_the_same_values_are_unchanged(
    tmp_path: Path, tiny_baseline: Path, base: Path
) -> None:
    """The digest is of the float32 matrices the fit sees: a bf16 checkpoint saved again as
    float32 holds the same values (unchanged), while a float32 checkpoint taken through bf16
    does not (its values were rounded: every layer refitted)."""
    half = producers.llama(tmp_path / "bf16", dtype=torch.bfloat16, shards=False)
    stored = tmp_path / "bf16-baseline"
    dynaudit.baseline(half, stored, **TINY)
    widened = derive(half, tmp_path / "fp32", lambda _, v: v.float())
    report = dynaudit.check(widened, stored)
    assert report.comparison.refits == 0 and len(report.comparison.unchanged or []) == LAYERS
    rounded = derive(base, tmp_path / "rounded", lambda _, v: v.to(torch.bfloat16).float())
    report = dynaudit.check(rounded, tiny_baseline, all_seeds=True)
    assert report.comparison.unchanged == [] and report.comparison.refits == 3 * LAYERS


def test_a_baseline_without_digests_refits_every_layer(
    base: Path, gate_baseline: Path, tmp_path: Path
) -> None:
    from dynaudit.tensors import sha256_file

    old = shutil.copytree(gate_baseline, tmp_path / "old")
    data = json.loads((old / "baseline.json").read_text())
    for layer in data["layers"]:
        del layer["digest"]
    for layer in data["report"]["layers"]:  # skipped layers have none
        layer.pop("digest", None)
    (old / "baseline.json").write_text(json.dumps(data))
    manifest = json.loads((old / "manifest.json").read_text())
    manifest["baseline.json"] = sha256_file(old / "baseline.json")
    (old / "manifest.json").write_text(json.dumps(manifest))
    report = dynaudit.check(base, old)
    assert report.verdict.passed
    assert report.comparison.unchanged == [] and report.comparison.refits == LAYERS
    assert all(x.change is not None and x.change.mean == 0.0 for x in report.comparison.layers)


def test_nothing_to_refit_is_no_error(base: Path, gate_baseline: Path, tmp_path: Path) -> None:
    """Every layer NaN: no layer is refitted or unchanged, and no scope has members."""
    from experiments.derived import poison

    report = dynaudit.check(derive(base, tmp_path / "nan", poison("", float("nan"))),
                            gate_baseline)  # fmt: skip
    assert report.comparison.refits == 0 and report.comparison.unchanged == []
    assert len(report.comparison.non_finite) == LAYERS and not report.verdict.passed


# -- sequential seeds ---------------------------------------------------------------------


def test_far_from_every_threshold_one_seed_decides(base: Path, gate_baseline: Path,
                                                   tmp_path: Path) -> None:  # fmt: skip
    """Noise at 5 % (healthy) and a collapsed block (damage): the same verdicts as with all
    seeds; the healthy case refits every layer once."""
    noisy = derive(base, tmp_path / "noisy", noise(0.05))
    seq, full = dynaudit.check(noisy, gate_baseline), dynaudit.check(noisy, gate_baseline,
                                                                     all_seeds=True)  # fmt: skip
    assert seq.comparison.refits == LAYERS and full.comparison.refits == 3 * LAYERS
    assert seq.verdict.passed and seq.comparison.all.change is not None
    assert seq.comparison.all.change.seeds == 1
    same_verdict(seq, full)
    damaged = derive(base, tmp_path / "collapsed", collapse(2, "layers.1."))
    seq = dynaudit.check(damaged, gate_baseline)
    full = dynaudit.check(damaged, gate_baseline, all_seeds=True)
    assert not seq.verdict.passed
    assert len(changed(seq)) == 7 and full.comparison.refits == 3 * 7
    assert 7 <= (seq.comparison.refits or 0) <= 3 * 7
    same_verdict(seq, full)


def _one_noisy_layer(base: Path, out: Path) -> Path:
    """layers.1.mlp.down_proj with heavy noise (its change rises far), layers.3's o_proj
    nudged (a change far below it)."""
    gen = torch.Generator().manual_seed(0)
    return derive(base, out, edit({
        "layers.1.mlp.down_proj": lambda w: w + 0.6 * w.std() * torch.randn(w.shape,
                                                                             generator=gen),
        "layers.3.self_attn.o_proj": lambda w: w * 1.002,
    }))  # fmt: skip


def test_a_layer_at_its_threshold_gets_every_seed(
    base: Path, gate_baseline: Path, tmp_path: Path
) -> None:
    source = _one_noisy_layer(base, tmp_path / "noisy-layer")
    quiet = Policy(max_weight_change=None, max_noise_change=None)
    probe = dynaudit.check(source, gate_baseline, policy=quiet, all_seeds=True)
    moved = {x.name: x.change.mean for x in probe.comparison.layers if x.change is not None}
    noisy = moved["model.layers.1.mlp.down_proj.weight"]
    assert abs(noisy) > 10 * abs(moved["model.layers.3.self_attn.o_proj.weight"])
    at = quiet.model_copy(update={"max_layer_change": abs(noisy) * 100})
    seq = dynaudit.check(source, gate_baseline, policy=at)
    assert seq.comparison.refits == 3 + 1  # the layer at its threshold: all seeds
    seeds = {x.name: x.change.seeds for x in seq.comparison.layers if x.change is not None}
    assert seeds["model.layers.1.mlp.down_proj.weight"] == 3
    assert seeds["model.layers.3.self_attn.o_proj.weight"] == 1
    same_verdict(seq, dynaudit.check(source, gate_baseline, policy=at, all_seeds=True))
    far = dynaudit.check(source, gate_baseline, policy=quiet)
    assert far.comparison.refits == 2


def test_a_scope_at_its_threshold_gets_every_seed_of_its_layers(
    base: Path, gate_baseline: Path, tmp_path: Path
) -> None:
    source = derive(base, tmp_path / "collapsed", edit({
        "layers.0.self_attn.q_proj": lambda w: collapse(2)("w", w),
        "layers.3.self_attn.o_proj": lambda w: w * 1.002,
    }))  # fmt: skip
    lenient = Policy(max_layer_change=99, max_weight_change=None, max_noise_change=None,
                     max_drop_all=99, max_drop_group=99, noise_multiple=0)  # fmt: skip
    probe = dynaudit.check(source, gate_baseline, policy=lenient, all_seeds=True)
    assert probe.comparison.all.change is not None
    drop = -probe.comparison.all.change.mean
    assert drop > 0
    at = lenient.model_copy(update={"max_drop_all": drop * 100})
    seq = dynaudit.check(source, gate_baseline, policy=at)
    assert seq.comparison.refits == 2 * 3  # every changed layer of the undecided scope
    assert seq.comparison.all.change is not None and seq.comparison.all.change.seeds == 3
    same_verdict(seq, dynaudit.check(source, gate_baseline, policy=at, all_seeds=True))
    assert dynaudit.check(source, gate_baseline, policy=lenient).comparison.refits == 2


@pytest.mark.parametrize(
    ("change", "margin", "displacement", "bound", "undecided"),
    [
        (0.10, 0.01, None, None, False),
        (0.245, 0.01, None, None, True),  # |change| within the margin of 25 %
        (-0.255, 0.01, None, None, True),  # either direction
        (-0.27, 0.01, None, None, False),
        (0.0, 0.01, 0.5, 0.6, True),  # displacement within a quarter of the bound
        (0.0, 0.01, 0.4, 0.6, False),
        (0.0, 0.01, 0.59, None, False),  # no bound: no displacement verdict
    ],
)
def test_layer_undecided(
    change: float, margin: float, displacement: float | None, bound: float | None,
    undecided: bool,
) -> None:  # fmt: skip
    policy = Policy(max_displacement=bound)
    assert layer_undecided(change, margin, displacement, 0.25, policy) is undecided


@pytest.mark.parametrize(
    ("change", "margin", "undecided"),
    [
        (0.0, 0.005, False),  # healthy: no failing verdict within reach
        (0.03, 0.005, False),  # a rise
        (-0.019, 0.005, True),  # at the 2 % limit
        (-0.10, 0.005, False),  # far beyond it, and beyond 3 × any noise the margin allows
        (-0.10, 0.04, True),  # beyond the limit, but perhaps within 3 × the seeds' std
    ],
)
def test_scope_undecided(change: float, margin: float, undecided: bool) -> None:
    assert scope_undecided(change, 0.0002, margin, 2.0, Policy()) is undecided


def test_a_figure_from_one_seed_shows_no_spread() -> None:
    from dynaudit.gate import decide
    from dynaudit.schema import Change, Comparison, GroupComparison, LayerComparison

    one = Change(mean=-0.3, std=0.0, absolute=-0.3, seeds=1)
    layer = LayerComparison(
        name="w", type="query", depth=0, group="bottom", shape=[1, 4, 4],
        baseline_mean_distance=1.0, mean_distance=0.7, change=one, displacement=0.1,
        null_drift=0.001, noise=0.001, fidelity=0.5,
    )  # fmt: skip
    group = GroupComparison(layers=1, change=one, noise=0.001, displacement=0.1)
    comparison = Comparison(layers=[layer], all=group, groups={"bottom": group}, types={})
    reasons = decide(comparison, Policy()).reasons
    assert reasons and all("(1 seed)" in r and "±" not in r.split("(limit")[0] for r in reasons)


# -- under torchrun ------------------------------------------------------------------------


class _Board:
    """What two in-process "ranks" exchange: each gather waits for both."""

    def __init__(self, size: int) -> None:
        self.slots: list[Any] = [None] * size
        self.barrier = threading.Barrier(size, timeout=300)


class _ThreadRanks(Ranks):
    board: ClassVar[_Board]

    def gather(self, value: Any) -> list[Any]:
        self.board.slots[self.rank] = pickle.dumps(value)  # what all_gather_object sends
        self.board.barrier.wait()
        out = [pickle.loads(part) for part in self.board.slots]
        self.board.barrier.wait()
        return out


def test_two_ranks_refit_each_stage_once_and_agree(
    base: Path, gate_baseline: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """compare_plan over two ranks (threads exchanging pickles, as all_gather_object does),
    with one layer at its threshold: both stages are shared, every rank gets the single
    process's comparison."""
    from dynaudit.engine import compare as comparison

    source = _one_noisy_layer(base, tmp_path / "noisy-layer")
    quiet = Policy(max_weight_change=None, max_noise_change=None)
    probe = dynaudit.check(source, gate_baseline, policy=quiet, all_seeds=True)
    noisy = next(x for x in probe.comparison.layers if "1.mlp.down_proj" in x.name)
    assert noisy.change is not None
    policy = quiet.model_copy(update={"max_layer_change": abs(noisy.change.mean) * 100})
    single = dynaudit.check(source, gate_baseline, policy=policy)
    _ThreadRanks.board = _Board(2)
    by_thread = {f"rank{r}": _ThreadRanks(r, 2) for r in (0, 1)}
    monkeypatch.setattr(comparison, "current", lambda: by_thread[threading.current_thread().name])
    refitted: list[tuple[str, str, int]] = []  # (rank, layer, seed)
    original = comparison._warm_refits

    def recorded(target: Any, stored: Any, ref: Any, run: Any, seeds: range, refits: Any) -> None:
        refitted.extend((threading.current_thread().name, ref.name, k) for k in seeds)
        original(target, stored, ref, run, seeds, refits)

    monkeypatch.setattr(comparison, "_warm_refits", recorded)
    results: dict[str, CheckReport] = {}

    def run() -> None:
        results[threading.current_thread().name] = dynaudit.check(
            source, gate_baseline, policy=policy
        )

    threads = [threading.Thread(target=run, name=name) for name in by_thread]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    assert set(results) == set(by_thread)
    want = single.comparison.model_dump(exclude={"layers": {"__all__": {"seconds"}}})
    for report in results.values():
        assert report.comparison.refits == 3 + 1
        assert report.comparison.model_dump(exclude={"layers": {"__all__": {"seconds"}}}) == want
    # Each refit ran once, on one rank; both ranks worked.
    assert sorted((layer, k) for _, layer, k in refitted) == sorted(
        [(noisy.name, 0), (noisy.name, 1), (noisy.name, 2),
         ("model.layers.3.self_attn.o_proj.weight", 0)]
    )  # fmt: skip
    assert {rank for rank, _, _ in refitted} == set(by_thread)
