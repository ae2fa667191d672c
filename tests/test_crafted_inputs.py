"""Crafted inputs are input errors (exit 3, one line), never "a bug in dynaudit" (exit 4):
checkpoints whose layer tensors have the wrong number of dimensions or an empty one, LoRA
adapter configs and factors that PEFT never writes, adapters whose base leads back to
themselves; and policy errors that name the key, the value and where it came from."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from dynaudit.cli import main
from dynaudit.families import Family, Layer, LayerPlan
from dynaudit.families.base import StructureError
from dynaudit.tensors import Checkpoint
from tests import producers

FAST = ["--q-dim", "16", "--pieces", "4", "--steps", "30", "--no-cache"]
Q_PROJ = "model.layers.0.self_attn.q_proj.weight"
LORA_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
LORA_B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


def one_line(args: list[str], capsys: pytest.CaptureFixture[str], code: int = 3) -> str:
    """Run the CLI; it must exit ``code`` with exactly one line on stderr, which is returned."""
    capsys.readouterr()
    assert main(args) == code, capsys.readouterr().err
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("dynaudit: error: "), err
    assert "internal error" not in err and "Traceback" not in err
    return lines[0]


def edited(source: Path, out: Path, tensors: dict[str, torch.Tensor]) -> Path:
    """A copy of the checkpoint ``source`` with ``tensors`` replaced, via safetensors."""
    shutil.copytree(source, out)
    weights = out / "model.safetensors"
    state = load_file(weights)
    state.update(tensors)
    save_file(state, str(weights), metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("crafted")
    return {
        "llama": producers.llama(root / "llama", dtype=torch.float32, shards=False),
        "resnet": producers.resnet_hf(root / "resnet"),
        "vit": producers.vit_hf(root / "vit"),
    }


STEM = "resnet.embedder.embedder.convolution.weight"
BLOCK_CONV = "resnet.encoder.stages.0.layers.0.layer.0.convolution.weight"
PATCH = "vit.embeddings.patch_embeddings.projection.weight"
VIT_QUERY = "vit.encoder.layer.0.attention.attention.query.weight"

CHECKPOINTS = [
    ("llama", Q_PROJ, torch.randn(64), "has shape [64]; the weight of a linear layer"),
    ("llama", Q_PROJ, torch.randn(4, 4, 4), "has shape [4, 4, 4]; the weight of a linear"),
    ("llama", Q_PROJ, torch.randn(0, 64), "has shape [0, 64]: 0 output features"),
    ("llama", Q_PROJ, torch.randn(32, 0), "has shape [32, 0]: 0 input features"),
    ("llama", "model.layers.1.mlp.down_proj.weight", torch.randn(64), "has shape [64]"),
    ("llama", "lm_head.weight", torch.randn(64), "lm_head.weight has shape [64]"),
    ("resnet", STEM, torch.randn(8, 0, 7, 7), "has shape [8, 0, 7, 7]: 0 input channels"),
    ("resnet", BLOCK_CONV, torch.randn(8, 0, 3, 3), "0 input channels"),
    ("resnet", BLOCK_CONV, torch.randn(0, 8, 3, 3), "0 output channels"),
    ("resnet", BLOCK_CONV, torch.randn(8, 8, 0, 3), "0 kernel rows"),
    ("vit", PATCH, torch.randn(32, 0, 4, 4), "0 input channels"),
    ("vit", PATCH, torch.randn(32, 48), "the weight of a convolution (patch) is 4-D"),
    ("vit", VIT_QUERY, torch.randn(32), "has shape [32]; the weight of a linear layer"),
    ("vit", VIT_QUERY, torch.randn(4, 4, 2), "has shape [4, 4, 2]"),
    ("vit", VIT_QUERY, torch.randn(0, 32), "0 output features"),
]


@pytest.mark.parametrize(
    ("model", "tensor", "value", "expected"),
    CHECKPOINTS,
    ids=[f"{m}-{t.split('.')[-2]}-{list(v.shape)}" for m, t, v, _ in CHECKPOINTS],
)
def test_a_layer_tensor_of_the_wrong_shape_is_exit_3(
    models: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    model: str,
    tensor: str,
    value: torch.Tensor,
    expected: str,
) -> None:
    crafted = edited(models[model], tmp_path / "crafted", {tensor: value})
    line = one_line(["measure", str(crafted), *FAST], capsys)
    assert tensor in line and expected in line


@pytest.mark.parametrize("family", ["cnn", "generic"])
def test_a_conv_with_no_input_channels_is_never_a_crash(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], family: str
) -> None:
    """A plain CNN whose first conv has 0 input channels: the cnn and generic families skip
    the empty tensor (and say so) or refuse the checkpoint, never crash."""
    folder = tmp_path / "cnn"
    folder.mkdir()
    torch.manual_seed(0)
    save_file(
        {"conv1.weight": torch.randn(8, 0, 3, 3), "conv2.weight": torch.randn(8, 8, 3, 3),
         "fc1.weight": torch.randn(4, 8)},
        str(folder / "model.safetensors"),
    )  # fmt: skip
    report = tmp_path / "report.json"
    code = main(["measure", str(folder), "--family", family, "--json", str(report), *FAST])
    err = capsys.readouterr().err
    assert code in (0, 3) and "internal error" not in err
    if code == 0:
        layers = {layer["name"]: layer for layer in json.loads(report.read_text())["layers"]}
        assert layers["conv1.weight"].get("skipped") == "empty tensor"


class _Careless(Family):
    """A third-party family that plans every tensor as a linear layer, checking nothing."""

    name = "careless"

    def detect(self, checkpoint: Checkpoint) -> float:
        return 0.0

    def plan(self, checkpoint: Checkpoint) -> LayerPlan:
        return LayerPlan([Layer(n, "linear", i) for i, n in enumerate(checkpoint.names())])


def test_the_contract_checks_every_plugins_plan(tmp_path: Path) -> None:
    """The check lives in the family contract: a plugin that checks nothing still gives an
    input error, not a crash in the engine."""
    folder = tmp_path / "model"
    folder.mkdir()
    save_file({"a.weight": torch.randn(8, 8), "b.weight": torch.randn(8, 0, 2)},
              str(folder / "model.safetensors"))  # fmt: skip
    with Checkpoint.open(folder) as checkpoint, pytest.raises(StructureError) as caught:
        _Careless().plan(checkpoint)
    assert caught.value.exit_code == 3
    assert "careless: b.weight has shape [8, 0, 2]" in caught.value.message


# -- LoRA adapters --------------------------------------------------------------------


@pytest.fixture(scope="module")
def adapter(models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real PEFT LoRA adapter (r 4, alpha 8, q_proj and v_proj) over the float32 LLaMA."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(1)
    model = LlamaForCausalLM.from_pretrained(models["llama"])
    config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                        target_modules=["q_proj", "v_proj"])  # fmt: skip
    out = tmp_path_factory.mktemp("adapter") / "adapter"
    get_peft_model(model, config).save_pretrained(str(out))
    return out


def crafted_adapter(
    source: Path,
    out: Path,
    config: dict[str, Any] | None = None,
    tensors: dict[str, torch.Tensor] | None = None,
) -> Path:
    shutil.copytree(source, out)
    settings = json.loads((out / "adapter_config.json").read_text())
    settings.update(config or {})
    (out / "adapter_config.json").write_text(json.dumps(settings))
    if tensors:
        weights = out / "adapter_model.safetensors"
        state = load_file(weights)
        state.update(tensors)
        save_file(state, str(weights), metadata={"format": "pt"})
    return out


CONFIGS: list[tuple[str, dict[str, Any], str]] = [
    ("r-0", {"r": 0}, "r is 0; the LoRA rank must be a positive integer"),
    ("r-string", {"r": "four"}, 'r is "four"'),
    ("r-null", {"r": None}, "r is null"),
    ("r-float", {"r": 4.5}, "r is 4.5"),
    ("r-bool", {"r": True}, "r is true"),
    ("alpha-string", {"lora_alpha": "eight"}, 'lora_alpha is "eight"; lora_alpha must be a'),
    ("alpha-null", {"lora_alpha": None}, "lora_alpha is null"),
    ("alpha-nan", {"lora_alpha": float("nan")}, "lora_alpha is NaN; lora_alpha must be a finite"),
    ("rank-pattern-regex", {"rank_pattern": {"q_proj[": 4}},
     'rank_pattern key is "q_proj["; not a regular expression'),
    ("rank-pattern-list", {"rank_pattern": ["q_proj"]}, 'rank_pattern is ["q_proj"]; it must'),
    ("rank-pattern-value", {"rank_pattern": {"q_proj": "x"}}, "rank_pattern['q_proj'] is \"x\""),
    ("alpha-pattern-regex", {"alpha_pattern": {"(": 4}}, 'alpha_pattern key is "("; not a'),
    ("alpha-pattern-list", {"alpha_pattern": [1]}, "alpha_pattern is [1]"),
    ("base-list", {"base_model_name_or_path": ["a", "b"]},
     'base_model_name_or_path is ["a", "b"]; it must be one model'),
    ("base-number", {"base_model_name_or_path": 3}, "base_model_name_or_path is 3"),
    ("rslora-string", {"use_rslora": "no"}, 'use_rslora is "no"; it must be true or false'),
    ("fan-in-fan-out-string", {"fan_in_fan_out": "yes"}, 'fan_in_fan_out is "yes"'),
]  # fmt: skip


@pytest.mark.parametrize(("config", "expected"), [c[1:] for c in CONFIGS],
                         ids=[c[0] for c in CONFIGS])  # fmt: skip
def test_a_malformed_adapter_config_is_exit_3(
    adapter: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    config: dict[str, Any],
    expected: str,
) -> None:
    crafted = crafted_adapter(adapter, tmp_path / "adapter", config)
    line = one_line(["measure", str(crafted), *FAST], capsys)
    assert f"{crafted / 'adapter_config.json'}: {expected}" in line


FACTORS: list[tuple[str, dict[str, torch.Tensor], str]] = [
    ("B-0d", {LORA_B: torch.tensor(1.0)}, "lora_B.weight' has shape []"),
    ("A-0d", {LORA_A: torch.tensor(1.0)}, "lora_A.weight' has shape []"),
    ("B-1d", {LORA_B: torch.randn(32)}, "lora_B.weight' has shape [32]"),
    ("B-3d", {LORA_B: torch.randn(32, 4, 1)}, "lora_B.weight' has shape [32, 4, 1]"),
    ("B-empty", {LORA_B: torch.randn(32, 0)}, "lora_B.weight' has shape [32, 0]"),
    ("B-wrong-rank", {LORA_B: torch.randn(32, 3)}, "A [4, 32] and B [32, 3]; its config says"),
]


@pytest.mark.parametrize(("tensors", "expected"), [f[1:] for f in FACTORS],
                         ids=[f[0] for f in FACTORS])  # fmt: skip
def test_malformed_lora_factors_are_exit_3(
    adapter: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    tensors: dict[str, torch.Tensor],
    expected: str,
) -> None:
    crafted = crafted_adapter(adapter, tmp_path / "adapter", tensors=tensors)
    assert expected in one_line(["measure", str(crafted), *FAST], capsys)


def test_an_adapter_over_itself_names_the_cycle(
    adapter: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    own = tmp_path / "own"
    crafted_adapter(adapter, own, {"base_model_name_or_path": str(own)})
    line = one_line(["measure", str(own), *FAST], capsys)
    assert f"leads back to itself ({own} → {own})" in line
    assert "not JSON" not in line


def test_two_adapters_over_each_other_name_the_cycle(
    adapter: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    crafted_adapter(adapter, first, {"base_model_name_or_path": str(second)})
    crafted_adapter(adapter, second, {"base_model_name_or_path": str(first)})
    line = one_line(["measure", str(first), *FAST], capsys)
    assert f"leads back to itself ({first} → {second} → {first})" in line


# -- policy and flag errors -----------------------------------------------------------

PolicyRun = Callable[..., str]


@pytest.fixture
def policy_error(models: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> PolicyRun:
    def run(*flags: str) -> str:
        return one_line(["check", str(models["llama"]), "--baseline", str(models["llama"]),
                         *flags], capsys, code=2)  # fmt: skip

    return run


def test_a_bad_policy_flag_names_the_flag_not_a_missing_pyproject(
    policy_error: PolicyRun, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # no pyproject.toml here
    line = policy_error("--max-drop-all", "-1")
    assert "--max-drop-all -1: Input should be greater than or equal to 0" in line
    assert "pyproject" not in line and "validation error for" not in line
    assert "--max-layer-change 0: Input should be greater than 0" in policy_error(
        "--max-layer-change", "0"
    )


def test_a_bad_policy_file_names_the_key_the_value_and_the_file(
    policy_error: PolicyRun, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    policy = tmp_path / "gate.toml"
    policy.write_text('max_drop_all = "two"\n')
    line = policy_error("--policy", str(policy))
    assert f"max_drop_all = 'two' (--policy {policy}): Input should be a valid number" in line
    policy.write_text("[tool.dynaudit.policy]\nmax_drop_grup = 3\n")
    line = policy_error("--policy", str(policy))
    assert f"max_drop_grup ([tool.dynaudit.policy] of {policy}) is not a policy setting" in line
    assert "max_drop_group" in line  # the settings it could have meant
    monkeypatch.chdir(tmp_path)
    Path("pyproject.toml").write_text("[tool.dynaudit.policy]\nnoise_floor = -3\n")
    line = policy_error()
    assert "noise_floor = -3 ([tool.dynaudit.policy] of pyproject.toml): Input should be" in line
    # Each problem from where it came: the file's key, and the flag.
    line = policy_error("--max-drop-all", "-2")
    assert "noise_floor = -3 ([tool.dynaudit.policy] of pyproject.toml)" in line
    assert "--max-drop-all -2: Input should be" in line
