"""CUDA against the CPU on the current code, in one short run on a lent GPU machine.

    python -m bench.cuda --out DIR                 # on a CUDA machine (prints "no CUDA device"
                                                   # and exits 0 elsewhere)
    python -m bench.cuda --out DIR --device cpu-smoke   # every part, the CPU standing in for
                                                   # CUDA, small settings: tests the script

Why: the GPU path (docs/performance.md, "GPU path") was last measured in session 10; since then
the fit kernel, stacked-expert reads and FP8 dequantize-on-read changed. Each part compares the
public API on the two devices, on real tiny checkpoints from the tests' own producers:

1. ``gradient``: the hand-written gradient against autograd on CUDA, float64 (the case of
   tests/test_kernel.py::test_hand_written_gradient_matches_autograd).
2. ``measure``: ``dynaudit.measure`` with the default settings and seed 0 on CPU and on CUDA
   (twice: bit-identity) — a Mixtral whose experts are a fused 3-D stack (stack index reads)
   and a LLaMA stored as FP8 E4M3 with 128×128 ``weight_scale_inv`` blocks (dequantize on read).
3. ``check``: a baseline (K = 1) of a tiny LLaMA and checks of a gently and a heavily changed
   copy, on each device: the same verdicts, the same per-layer changes.
4. ``timing``: one default fit of the block a 4096² matrix is fitted on (``max_entries``),
   CPU against CUDA after a warm-up, synchronised; then ms per step of the whole 4096².

Every number goes to DIR/cuda.json (rewritten after each part, so a run cut short still leaves
what it did). A part starts only while the run is under ``--budget`` seconds (default 150).
"""

from __future__ import annotations

import argparse
import functools
import importlib.metadata
import json
import logging
import math
import os
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if (ROOT / "dynaudit").is_dir():  # python .devrun/cuda.py from the repository root works too
    sys.path[:0] = [p for p in (str(ROOT), str(ROOT / "plugins")) if p not in sys.path]
elif str(Path.cwd()) not in sys.path:
    sys.path[:0] = [str(Path.cwd()), str(Path.cwd() / "plugins")]

PLUGIN_GROUP = "dynaudit.plugins"
STARTED = time.perf_counter()


def elapsed() -> float:
    return time.perf_counter() - STARTED


# ── set-up ───────────────────────────────────────────────────────────────────────────────


def ensure_plugins(force: bool = False) -> str:
    """The families are found through entry points: on a machine where dynaudit is not
    installed (the device gets the source tree only) there are none, and nothing is planned.
    Then declare them from pyproject.toml in a throw-away dist-info on sys.path."""
    if not force and list(importlib.metadata.entry_points(group=PLUGIN_GROUP)):
        return "installed"
    import tomllib  # the device's Python is 3.12

    project = tomllib.loads((Path.cwd() / "pyproject.toml").read_text())["project"]
    plugins = project["entry-points"][PLUGIN_GROUP]
    site = Path(tempfile.mkdtemp(prefix="dynaudit-ep-"))
    info = site / "dynaudit_bench_plugins-0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: dynaudit-bench-plugins\nVersion: 0\n"
    )
    lines = [f"[{PLUGIN_GROUP}]"] + [f"{k} = {v}" for k, v in plugins.items()]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
    sys.path.append(str(site))
    importlib.invalidate_caches()
    return f"declared from pyproject.toml ({len(plugins)})"


def _init_llama(out: Path, intermediate: int, dtype: torch.dtype) -> Path:
    """Without transformers: a LlamaForCausalLM state dict with its names and config."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(0)
    hidden, kv, vocab, blocks = 32, 16, 64, 4

    def w(*shape: int) -> torch.Tensor:
        return (0.02 * torch.randn(*shape, generator=gen)).to(dtype)

    state = {"model.embed_tokens.weight": w(vocab, hidden), "lm_head.weight": w(vocab, hidden)}
    state["model.norm.weight"] = torch.ones(hidden, dtype=dtype)
    for i in range(blocks):
        p = f"model.layers.{i}."
        state |= {
            p + "self_attn.q_proj.weight": w(hidden, hidden),
            p + "self_attn.k_proj.weight": w(kv, hidden),
            p + "self_attn.v_proj.weight": w(kv, hidden),
            p + "self_attn.o_proj.weight": w(hidden, hidden),
            p + "mlp.gate_proj.weight": w(intermediate, hidden),
            p + "mlp.up_proj.weight": w(intermediate, hidden),
            p + "mlp.down_proj.weight": w(hidden, intermediate),
            p + "input_layernorm.weight": torch.ones(hidden, dtype=dtype),
            p + "post_attention_layernorm.weight": torch.ones(hidden, dtype=dtype),
        }
    out.mkdir(parents=True)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": intermediate, "num_hidden_layers": blocks, "head_dim": 8,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": vocab,
        "tie_word_embeddings": False, "rms_norm_eps": 1e-6,
    }  # fmt: skip
    (out / "config.json").write_text(json.dumps(config))
    return out


def _init_mixtral_fused(out: Path) -> Path:
    """Without transformers: MixtralForCausalLM's in-memory state dict (transformers ≥ 5),
    experts fused in 3-D ``mlp.experts.gate_up_proj`` / ``down_proj``."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(0)
    hidden, kv, inter, experts, vocab = 32, 16, 24, 4, 64

    def w(*shape: int) -> torch.Tensor:
        return 0.02 * torch.randn(*shape, generator=gen)

    state = {"model.embed_tokens.weight": w(vocab, hidden), "lm_head.weight": w(vocab, hidden)}
    state["model.norm.weight"] = torch.ones(hidden)
    for i in range(2):
        p = f"model.layers.{i}."
        state |= {
            p + "self_attn.q_proj.weight": w(hidden, hidden),
            p + "self_attn.k_proj.weight": w(kv, hidden),
            p + "self_attn.v_proj.weight": w(kv, hidden),
            p + "self_attn.o_proj.weight": w(hidden, hidden),
            p + "mlp.gate.weight": w(experts, hidden),
            p + "mlp.experts.gate_up_proj": w(experts, 2 * inter, hidden),
            p + "mlp.experts.down_proj": w(experts, hidden, inter),
            p + "input_layernorm.weight": torch.ones(hidden),
            p + "post_attention_layernorm.weight": torch.ones(hidden),
        }
    out.mkdir(parents=True)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = {
        "model_type": "mixtral", "hidden_size": hidden, "intermediate_size": inter,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "num_local_experts": experts, "num_experts_per_tok": 2, "vocab_size": vocab,
        "tie_word_embeddings": False, "rms_norm_eps": 1e-5,
    }  # fmt: skip
    (out / "config.json").write_text(json.dumps(config))
    return out


def fixtures(root: Path) -> tuple[dict[str, Path], str]:
    """The checkpoints: from tests/producers.py (transformers' save_pretrained) when
    transformers imports, else the same tensor names written with plain torch."""
    from experiments.derived import derive, noise
    from tests import producers

    try:
        import transformers

        made_by = f"tests/producers.py (transformers {transformers.__version__})"
        llama = producers.llama(root / "llama", dtype=torch.float32)
        mixtral = producers.mixtral(root / "mixtral-fused", fused=True)
        bf16 = producers.llama(root / "llama-200", dtype=torch.bfloat16, intermediate_size=200)
    except ImportError as exc:
        made_by = f"plain torch, same names ({exc})"
        llama = _init_llama(root / "llama", 64, torch.float32)
        mixtral = _init_mixtral_fused(root / "mixtral-fused")
        bf16 = _init_llama(root / "llama-200", 200, torch.bfloat16)
    fp8 = producers.fp8_checkpoint(bf16, root / "llama-fp8", block=(128, 128))
    return {
        "llama": llama,
        "llama_gentle": derive(llama, root / "llama-gentle", noise(0.02, seed=1)),
        "llama_heavy": derive(llama, root / "llama-heavy", noise(1.0, seed=2)),
        "mixtral_fused": mixtral,
        "llama_fp8": fp8,
    }, made_by


# ── comparisons ──────────────────────────────────────────────────────────────────────────


def rel(a: float | None, b: float | None) -> float:
    """|a − b| / max(|a|, |b|); 0 when both are equal (None with None included)."""
    if a is None or b is None:
        return 0.0 if a is b else math.inf
    top = max(abs(a), abs(b))
    return 0.0 if a == b else abs(a - b) / top if top else math.inf


def figures(report: Any) -> dict[str, tuple[Any, ...]]:
    """Per fitted layer: (discrepancy, mean distance, fidelity)."""
    return {x.name: (x.discrepancy, x.mean_distance, x.fidelity) for x in report.measured}


def compare_reports(a: Any, b: Any) -> dict[str, Any]:
    fa, fb = figures(a), figures(b)
    assert fa.keys() == fb.keys(), (sorted(fa), sorted(fb))
    out: dict[str, Any] = {"layers": len(fa)}
    for i, key in enumerate(("discrepancy", "mean_distance", "fidelity")):
        diffs = {name: rel(fa[name][i], fb[name][i]) for name in fa}
        worst = max(diffs, key=lambda n: diffs[n]) if diffs else None
        out[f"{key}_max_rel"] = diffs[worst] if worst else 0.0
        out[f"{key}_worst_layer"] = worst
    out["fidelity_max_abs"] = max(
        (abs(fa[n][2] - fb[n][2]) for n in fa if fa[n][2] is not None and fb[n][2] is not None),
        default=0.0,
    )
    out["summary_mean_distance_rel"] = rel(a.summary.all.mean_distance, b.summary.all.mean_distance)
    return out


def identical(a: Any, b: Any) -> dict[str, Any]:
    fa, fb = figures(a), figures(b)
    differing = [name for name in fa if fa[name] != fb.get(name)]
    return {"bit_identical": not differing, "differing_layers": differing[:10]}


# ── parts ────────────────────────────────────────────────────────────────────────────────


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def part_gradient(device: torch.device) -> dict[str, Any]:
    """tests/test_kernel.py::test_hand_written_gradient_matches_autograd, on ``device``."""
    from dynaudit.dynamics.kernel import _gradient, _Work
    from dynaudit.runtime import torch_scope

    m, n, h, k, mu = 6, 5, 4, 3, 0.05
    gen = torch.Generator().manual_seed(0)
    coords = torch.randn(2, h, m + n, k, generator=gen).double().to(device)
    target = torch.randn(2, m, n, dtype=torch.float64).to(device)
    eps2 = torch.zeros(2, 1, 1, 1, dtype=torch.float64, device=device)
    with torch_scope(device, None):  # as the engine runs it (cuBLAS' workspace setting)
        work = _Work(coords.transpose(2, 3).contiguous(), target, 1)  # one-row tiles
        ours = _gradient(work, eps2, mu).transpose(2, 3)
        leaf = coords.clone().requires_grad_(True)
        with torch.enable_grad():
            a, b = leaf[:, :, :m], leaf[:, :, m:]
            dist = torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist")
            signs = torch.tensor([-1.0] * (h // 2) + [1.0] * (h // 2), dtype=torch.float64)
            what = (dist * signs.to(device).view(1, h, 1, 1)).sum(1)
            loss = ((what - target) ** 2).mean(dim=(1, 2)).sum()
            loss = loss + mu * leaf.pow(2).sum(dim=(1, 3)).mean(dim=1).sum()
            (expected,) = torch.autograd.grad(loss, leaf)
    diff = (ours - expected).abs()
    return {
        "rows_per_tile": work.rows,
        "max_abs": float(diff.max()),
        "max_rel": float((diff / expected.abs().clamp_min(1e-300)).max()),
        "allclose_rtol1e-6_atol1e-9": bool(torch.allclose(ours, expected, rtol=1e-6, atol=1e-9)),
    }


def part_measure(path: Path, target: str, settings: dict[str, Any]) -> dict[str, Any]:
    import dynaudit

    runs: dict[str, Any] = {}
    walls: dict[str, float] = {}
    for label, device in (("cpu", "cpu"), (target, target), (f"{target}_again", target)):
        t0 = time.perf_counter()
        runs[label] = dynaudit.measure(path, cache=False, seed=0, device=device, **settings)
        walls[label] = round(time.perf_counter() - t0, 3)
    first = runs["cpu"]
    return {
        "family": first.family.name,
        # what says the new read paths ran: the fused stack's plan note, FP8's selection note
        "notes": [n for n in first.family.notes if "fused" in n],
        "selection": first.source.selection,
        "fitted_layers": len(figures(first)),
        "steps": sorted({x.steps for x in first.measured}),
        "wall_s": walls,
        "cpu_vs_device": compare_reports(first, runs[target]),
        "device_repeat": identical(runs[target], runs[f"{target}_again"]),
        "mean_distance": {k: r.summary.all.mean_distance for k, r in runs.items()},
    }


def part_check(fx: dict[str, Path], target: str, settings: dict[str, Any]) -> dict[str, Any]:
    import dynaudit

    per: dict[str, dict[str, Any]] = {}
    walls: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="bench-cuda-baselines-") as tmp:
        for i, device in enumerate(("cpu", target)):
            t0 = time.perf_counter()
            stored = Path(tmp) / f"{i}-{device}"
            # K = 1: the comparison of devices, not the gate's spread, is what is measured.
            dynaudit.baseline(fx["llama"], stored, seeds=1, seed=0, device=device, **settings)
            per[device] = {
                which: dynaudit.check(fx[f"llama_{which}"], stored, device=device, cache=False)
                for which in ("gentle", "heavy")
            }
            walls[device] = round(time.perf_counter() - t0, 3)
    out: dict[str, Any] = {"wall_s": walls, "baseline_seeds": 1}
    for which in ("gentle", "heavy"):
        a, b = per["cpu"][which], per[target][which]
        ca = {x.name: x for x in a.comparison.layers}
        cb = {x.name: x for x in b.comparison.layers}

        def worst(get: Callable[[Any], float | None], ca: Any = ca, cb: Any = cb) -> float:
            pairs = [(get(ca[n]), get(cb[n])) for n in ca]
            return max(
                (abs(x - y) for x, y in pairs if x is not None and y is not None), default=0.0
            )

        all_a, all_b = a.comparison.all.change, b.comparison.all.change
        out[which] = {
            "verdict": {"cpu": a.verdict.verdict, target: b.verdict.verdict},
            "same_verdict": a.verdict.verdict == b.verdict.verdict,
            "same_failing_layers": a.verdict.failing_layers == b.verdict.failing_layers,
            "reasons_cpu": a.verdict.reasons[:3],
            "all_change": {
                "cpu": all_a.mean if all_a else None,
                target: all_b.mean if all_b else None,
            },
            "layer_change_max_abs": worst(lambda x: x.change.mean if x.change else None),
            "baseline_mean_distance_max_rel": max(
                rel(ca[n].baseline_mean_distance, cb[n].baseline_mean_distance) for n in ca
            ),
            "weight_change_max_abs": worst(lambda x: x.weight_change),
            "refits": a.comparison.refits,
        }
    return out


def part_timing(
    device: torch.device,
    size: int,
    fit: dict[str, Any],
    whole_steps: dict[str, int],
    guard: float,
) -> dict[str, Any]:
    """One default fit of the block a size² matrix is fitted on, per device, after a short
    warm-up fit; then ms per step of the whole matrix (few steps) while time allows."""
    from dynaudit.config import FitSettings
    from dynaudit.dynamics import discrepancy
    from dynaudit.dynamics.blocks import block_seed, block_shape, take_blocks
    from dynaudit.dynamics.kernel import fit_coordinates, fit_steps, init_coordinates, matrix_seed
    from dynaudit.dynamics.kernel import rms as rms_of
    from dynaudit.runtime import to_device, torch_scope

    settings = FitSettings(**fit)
    gen = torch.Generator().manual_seed(4096)
    matrix = torch.randn(1, size, size, generator=gen)
    matrix /= float(rms_of(matrix))
    shape = block_shape(size, size, settings.max_entries)
    block = take_blocks(matrix, shape, [block_seed(0, "w")])
    steps = fit_steps(settings, *shape)
    out: dict[str, Any] = {"matrix": [size, size], "block": list(shape), "steps": steps,
                           "settings": settings.numeric()}  # fmt: skip
    devices = [("cpu", torch.device("cpu")), ("device", device)]
    results: dict[str, Any] = {}
    for label, dev in devices:
        with torch_scope(dev, None):
            fitted = to_device(block, dev)
            init = init_coordinates(*shape, settings, [matrix_seed(0, "w")], rms_of(fitted).float())
            fit_coordinates(fitted, settings, init, steps=10)  # warm-up: allocations, kernels
            sync(dev)
            t0 = time.perf_counter()
            coords = fit_coordinates(fitted, settings, init)
            sync(dev)
            ms = (time.perf_counter() - t0) * 1e3
            _, md = discrepancy(coords)
        results[label] = {
            "fit_ms": round(ms, 2),
            "ms_per_step": round(ms / steps, 4),
            "mean_distance": float(md[0]),
        }
    a, b = results["cpu"], results["device"]
    out["cpu_over_device"] = round(a["fit_ms"] / b["fit_ms"], 3)
    out["mean_distance_rel"] = rel(a["mean_distance"], b["mean_distance"])
    out["block_fit"] = results
    whole: dict[str, Any] = {}
    s0 = settings.model_copy(update={"max_entries": 0})
    for label, dev in devices:
        if elapsed() > guard:
            whole[label] = "skipped (time)"
            continue
        n = whole_steps[label]
        with torch_scope(dev, None):
            target = to_device(matrix, dev)
            init = init_coordinates(size, size, s0, [1], rms_of(target).float())
            fit_coordinates(target, s0, init, steps=1)
            sync(dev)
            t0 = time.perf_counter()
            fit_coordinates(target, s0, init, steps=n)
            sync(dev)
            ms = (time.perf_counter() - t0) * 1e3
        per_step = ms / n
        whole[label] = {
            "steps": n,
            "ms_per_step": round(per_step, 3),
            "tflops": round(6 * s0.q_dim * size * size / per_step / 1e9, 3),
        }
    out["whole_matrix"] = whole
    return out


# ── driver ───────────────────────────────────────────────────────────────────────────────


def table(result: dict[str, Any], target: str) -> str:
    """The compact summary printed at the end."""
    parts = result["parts"]
    lines = [
        f"torch {result['torch']} | {result['device_name']} | "
        f"{result['wall_s']:.1f} s | fixtures: {result.get('fixtures_made_by')}"
    ]
    g = parts.get("gradient")
    if isinstance(g, dict) and "max_abs" in g:
        lines.append(
            f"gradient vs autograd ({target}, f64): max abs {g['max_abs']:.2e}, "
            f"max rel {g['max_rel']:.2e}, allclose {g['allclose_rtol1e-6_atol1e-9']}"
        )
    lines.append(
        f"{'measure':<16}{'layers':>7}{'md rel':>10}{'disc rel':>10}{'fid rel':>10}"
        f"{'fid abs':>10}{'repeat':>8}{'cpu s':>8}{'dev s':>8}"
    )
    for name, m in parts.get("measure", {}).items():
        if not isinstance(m, dict) or "cpu_vs_device" not in m:
            lines.append(f"{name:<16}{m!s:>40}")
            continue
        c = m["cpu_vs_device"]
        same = "same" if m["device_repeat"]["bit_identical"] else "DIFF"
        lines.append(
            f"{name:<16}{c['layers']:>7}{c['mean_distance_max_rel']:>10.1e}"
            f"{c['discrepancy_max_rel']:>10.1e}{c['fidelity_max_rel']:>10.1e}"
            f"{c['fidelity_max_abs']:>10.1e}{same:>8}"
            f"{m['wall_s']['cpu']:>8.1f}{m['wall_s'][target]:>8.1f}"
        )
    ch = parts.get("check")
    if isinstance(ch, dict) and "gentle" in ch:
        for which in ("gentle", "heavy"):
            c = ch[which]
            lines.append(
                f"check {which:<7} verdict cpu/{target} {c['verdict']['cpu']}/"
                f"{c['verdict'][target]} same={c['same_verdict']} "
                f"layer change max |Δ| {c['layer_change_max_abs']:.1e} "
                f"null md rel {c['baseline_mean_distance_max_rel']:.1e}"
            )
    t = parts.get("timing")
    if isinstance(t, dict) and "block_fit" in t:
        b = t["block_fit"]
        cells = ", ".join(f"{k} {v['fit_ms']:.0f} ms" for k, v in b.items())
        lines.append(
            f"fit of the {t['block'][0]}×{t['block'][1]} block of {t['matrix'][0]}² "
            f"({t['steps']} steps): {cells}; cpu/{target} {t.get('cpu_over_device')}"
        )
        w = t.get("whole_matrix", {})
        cells = ", ".join(
            f"{k} {v['ms_per_step']} ms/step" if isinstance(v, dict) else f"{k} {v}"
            for k, v in w.items()
        )
        lines.append(f"whole {t['matrix'][0]}² per step: {cells}")
    for name, p in parts.items():
        if isinstance(p, str):
            lines.append(f"{name}: {p}")
    for name, m in parts.get("measure", {}).items():
        if isinstance(m, str):
            lines.append(f"measure {name}: {m}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", choices=["cuda", "cpu-smoke"], default="cuda")
    parser.add_argument("--budget", type=float, default=150.0, help="no part starts after it")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    smoke = args.device == "cpu-smoke"
    if not smoke and not torch.cuda.is_available():
        print("no CUDA device")
        (args.out / "cuda.json").write_text(json.dumps({"cuda": False, "torch": torch.__version__}))
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    cache = tempfile.mkdtemp(prefix="bench-cuda-cache-")
    os.environ["DYNAUDIT_CACHE_DIR"] = cache  # the hash memo; results are never cached here
    target = "cpu" if smoke else "cuda"
    device = torch.device(target)
    # Smoke: small fits, a small timing matrix, the CPU standing in for CUDA.
    settings: dict[str, Any] = {"q_dim": 16, "pieces": 4, "steps": 40} if smoke else {}
    # The timing's settings: the defaults (max_entries 2^20: a 1024² block of a 4096² matrix).
    size, timing_fit = (512, {"max_entries": 1 << 16, "steps": 50}) if smoke else (4096, {})
    whole_steps = {"cpu": 2, "device": 2} if smoke else {"cpu": 3, "device": 50}

    plugins = ensure_plugins()  # before dynaudit first looks its families up (cached)
    import dynaudit

    result: dict[str, Any] = {
        "mode": args.device,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "python": platform.python_version(),
        "dynaudit": dynaudit.__version__,
        "device_name": torch.cuda.get_device_name() if not smoke else "cpu (smoke)",
        "cpu_threads": torch.get_num_threads(),
        "plugins": plugins,
        "settings": settings or "defaults",
        "budget_s": args.budget,
        "parts": {},
    }
    parts: dict[str, Any] = result["parts"]
    failed = []

    def save() -> None:
        result["wall_s"] = round(elapsed(), 2)
        (args.out / "cuda.json").write_text(json.dumps(result, indent=2, default=str))

    def run(name: str, fn: Callable[[], Any], into: dict[str, Any] = parts) -> None:
        if elapsed() > args.budget:
            into[name] = f"skipped: {elapsed():.0f} s > budget {args.budget:.0f} s"
        else:
            t0 = time.perf_counter()
            try:
                into[name] = fn()
            except Exception as exc:  # one broken part must not hide the others
                traceback.print_exc()
                into[name] = f"FAILED: {type(exc).__name__}: {exc}"
                failed.append(name)
            took = round(time.perf_counter() - t0, 2)
            result.setdefault("part_s", {})[name] = took
            print(f"[{elapsed():6.1f} s] {name} done in {took:.1f} s", flush=True)
        save()

    logging.getLogger("dynaudit").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="bench-cuda-") as tmp:
        fx: dict[str, Path] = {}

        def make() -> dict[str, str]:
            made, by = fixtures(Path(tmp))
            fx.update(made)
            result["fixtures_made_by"] = by
            return {k: str(v.name) for k, v in made.items()}

        run("fixtures", make)
        run("gradient", lambda: part_gradient(device))
        parts["measure"] = {}
        if fx:
            for name in ("mixtral_fused", "llama_fp8"):
                run(name, functools.partial(part_measure, fx[name], target, settings),
                    parts["measure"])  # fmt: skip
            run("check", lambda: part_check(fx, target, settings))
        run("timing", lambda: part_timing(device, size, timing_fit, whole_steps,
                                          args.budget + 20))  # fmt: skip
    result["failed_parts"] = failed
    save()
    print(table(result, target))
    print(f"wrote {args.out / 'cuda.json'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
