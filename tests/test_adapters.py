"""PEFT LoRA adapters audited as merged weights, checked against PEFT's own merge."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from dynaudit import measure
from dynaudit.errors import AdapterRefused
from dynaudit.sources import open_adapter
from tests import producers
from tests.cli import run_cli
from tests.conftest import small_settings

SETTINGS = small_settings(steps=40)


@pytest.fixture(scope="module")
def base_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A float32 tiny LLaMA (GQA) written by ``save_pretrained``."""
    return producers.llama(tmp_path_factory.mktemp("lora") / "base", dtype=torch.float32)


def make_adapter(base: Path, out: Path, **lora: Any) -> tuple[Path, Path]:
    """A PEFT adapter over ``base`` with random (non-zero) A and B, and the checkpoint PEFT
    writes after ``merge_and_unload()``: (adapter dir, merged dir)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(1)
    model = LlamaForCausalLM.from_pretrained(base)
    config = LoraConfig(
        r=4, lora_alpha=8, init_lora_weights=False,
        target_modules=["q_proj", "v_proj", "o_proj", "down_proj"], **lora,
    )  # fmt: skip
    peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(out / "adapter")
    peft_model.merge_and_unload().save_pretrained(out / "merged")
    return out / "adapter", out / "merged"


def numbers(report: Any) -> dict[str, tuple[float, float, float]]:
    return {
        layer.name: (layer.discrepancy, layer.mean_distance, layer.fidelity)
        for layer in report.measured
    }


@pytest.mark.parametrize(
    "lora",
    [
        {},
        {"use_rslora": True},
        {"rank_pattern": {"layers.1.self_attn.q_proj": 2}, "alpha_pattern": {"v_proj": 3}},
    ],
    ids=["lora", "rslora", "patterns"],
)
def test_adapter_measures_like_peft_merged_checkpoint(
    base_llama: Path, tmp_path: Path, lora: dict[str, Any]
) -> None:
    adapter, merged = make_adapter(base_llama, tmp_path, **lora)
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert Path(config["base_model_name_or_path"]) == base_llama
    # Merging on read gives PEFT's merged weights, tensor for tensor.
    with open_adapter(adapter) as ours:
        from dynaudit.tensors import Checkpoint

        with Checkpoint.open(merged) as theirs:
            assert set(ours.tensors) == set(theirs.tensors)
            for name in ours.tensors:
                torch.testing.assert_close(ours.read(name), theirs.read(name), rtol=0, atol=1e-6)
    a = measure(adapter, **SETTINGS)
    b = measure(merged, **SETTINGS)
    assert a.family.name == "llama" and len(a.measured) == len(b.measured) == 29
    for name, values in numbers(b).items():
        assert numbers(a)[name] == pytest.approx(values, rel=1e-4)
    assert any(key.startswith("adapter/") for key in a.source.files)


def test_adapter_base_flag_overrides_the_config(base_llama: Path, tmp_path: Path) -> None:
    adapter, merged = make_adapter(base_llama, tmp_path)
    config_path = adapter / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = str(tmp_path / "nowhere")
    config_path.write_text(json.dumps(config))
    report = measure(adapter, base=base_llama, **SETTINGS)
    expected = numbers(measure(merged, **SETTINGS))
    for name, values in expected.items():
        assert numbers(report)[name] == pytest.approx(values, rel=1e-4)
    # Pointing at the adapter's weights file audits the adapter, not its bare A and B.
    weights_file = measure(adapter / "adapter_model.safetensors", base=base_llama, **SETTINGS)
    assert weights_file.family.name == "llama"
    assert numbers(weights_file) == numbers(report)


def test_dora_is_refused_with_exit_3(base_llama: Path, tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(base_llama)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=True)
    get_peft_model(model, config).save_pretrained(tmp_path / "dora")
    with pytest.raises(AdapterRefused, match="DoRA"):
        open_adapter(tmp_path / "dora")
    proc = run_cli("measure", str(tmp_path / "dora"), "--q-dim", "8", "--pieces", "2")
    assert proc.returncode == 3, proc.stderr
    assert "DoRA" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert "Traceback" not in proc.stderr


def test_adapter_over_the_wrong_base_is_refused(base_llama: Path, tmp_path: Path) -> None:
    adapter, _ = make_adapter(base_llama, tmp_path)
    other = producers.qwen2(tmp_path / "other")
    proc = run_cli("measure", str(adapter), "--base", str(other), "--q-dim", "8", "--pieces", "2")
    assert proc.returncode == 3
    assert "wrong base" in proc.stderr and "Traceback" not in proc.stderr


def test_base_flag_on_a_plain_checkpoint_is_a_usage_error(base_llama: Path) -> None:
    proc = run_cli("measure", str(base_llama), "--base", str(base_llama))
    assert proc.returncode == 2
    assert "adapter" in proc.stderr


def test_modules_to_save_replace_the_base_tensor(base_llama: Path, tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    from dynaudit.tensors import Checkpoint

    torch.manual_seed(2)
    model = LlamaForCausalLM.from_pretrained(base_llama)
    config = LoraConfig(
        r=4, lora_alpha=8, init_lora_weights=False, target_modules=["q_proj"],
        modules_to_save=["lm_head"],
    )  # fmt: skip
    peft_model = get_peft_model(model, config)
    with torch.no_grad():  # a fine-tuned copy of the head, as training would leave it
        peft_model.base_model.model.lm_head.modules_to_save["default"].weight.add_(0.05)
    peft_model.save_pretrained(tmp_path / "adapter")
    peft_model.merge_and_unload().save_pretrained(tmp_path / "merged")
    with open_adapter(tmp_path / "adapter") as ours, Checkpoint.open(tmp_path / "merged") as theirs:
        for name in ("lm_head.weight", "model.layers.0.self_attn.q_proj.weight"):
            torch.testing.assert_close(ours.read(name), theirs.read(name), rtol=0, atol=1e-6)
        with Checkpoint.open(base_llama) as base:
            assert not torch.equal(ours.read("lm_head.weight"), base.read("lm_head.weight"))


def test_fan_in_fan_out_adapter_on_gpt2_conv1d(tmp_path: Path) -> None:
    """GPT-2 stores Conv1D weights (in, out): PEFT's fan_in_fan_out update is transposed."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    from dynaudit.tensors import Checkpoint

    torch.manual_seed(3)
    config = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=32)
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "base")
    model = GPT2LMHeadModel.from_pretrained(tmp_path / "base")
    lora = LoraConfig(
        r=4, lora_alpha=8, init_lora_weights=False, target_modules=["c_attn", "c_fc"],
        fan_in_fan_out=True,
    )  # fmt: skip
    peft_model = get_peft_model(model, lora)
    peft_model.save_pretrained(tmp_path / "adapter")
    peft_model.merge_and_unload().save_pretrained(tmp_path / "merged")
    with open_adapter(tmp_path / "adapter") as ours, Checkpoint.open(tmp_path / "merged") as theirs:
        changed = [n for n in ours.deltas]
        assert len(changed) == 4 and all(".attn.c_attn." in n or ".mlp.c_fc." in n for n in changed)
        for name in changed:
            torch.testing.assert_close(ours.read(name), theirs.read(name), rtol=0, atol=1e-6)
