"""Shared fixtures: isolated environment and checkpoints made by real producers."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from dynaudit.schema import Report
from tests import zoo
from tests.hubserver import LocalHub
from tests.mlflowserver import MlflowServer


@pytest.fixture(autouse=True)
def _isolate(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No test sees the developer's caches, tokens, servers or debug switches."""
    for var in (
        "DYNAUDIT_DEBUG", "HF_TOKEN", "HF_ENDPOINT", "HF_HUB_OFFLINE", "GITHUB_ACTIONS",
        "GITHUB_STEP_SUMMARY", "MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_TOKEN",
    ):  # fmt: skip
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    # huggingface_hub reads HF_HOME when imported: point the in-process client there too.
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-home" / "hub"))
    monkeypatch.setenv("DYNAUDIT_CACHE_DIR", str(tmp_path / "dynaudit-cache"))
    monkeypatch.setenv("CI", "true")


@pytest.fixture(scope="session")
def digits_mlp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An MLP 64 → 384 → 384 → 10 really trained on scikit-learn's digits."""
    out = tmp_path_factory.mktemp("digits-mlp")
    result = zoo.train_digits_mlp(out, hidden=(384, 384), epochs=30, seed=0)
    assert result["val_accuracy"] > 0.9
    return out


@pytest.fixture(scope="session")
def trained_matrix(digits_mlp: Path) -> torch.Tensor:
    """The trained 384 × 384 hidden matrix of :func:`digits_mlp`."""
    from dynaudit.tensors import Checkpoint

    with Checkpoint.open(digits_mlp) as checkpoint:
        square = [n for n, i in checkpoint.tensors.items() if i.shape == (384, 384)]
        return checkpoint.read(square[0])


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny LLaMA trained briefly on Python's own sources, saved by ``save_pretrained``."""
    out = tmp_path_factory.mktemp("tiny-llama")
    result = zoo.train_tiny_llama(out, steps=150)
    assert result["train_loss_last"] < result["train_loss_first"]
    return out


@pytest.fixture(scope="session")
def sharded_llama(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The trained tiny LLaMA re-saved by transformers in 1 MB shards, plus the files a real
    Hub repo has that an audit must not download (a pickle, a tokenizer)."""
    from transformers import LlamaForCausalLM

    out = tmp_path_factory.mktemp("sharded-llama")
    LlamaForCausalLM.from_pretrained(tiny_llama).save_pretrained(out, max_shard_size="1MB")
    (out / "pytorch_model.bin").write_bytes(b"a pickle must never be downloaded")
    (out / "tokenizer.json").write_text("{}")
    (out / "README.md").write_text("---\nbase_model: org/base\n---\n# tiny llama\n")
    return out


def figures(report: Report) -> dict[str, Any]:
    """The measured numbers of a report, without where they came from."""
    data = report.numbers()
    return {"layers": data["layers"], "summary": data["summary"], "family": data["family"]}


WriteCheckpoint = Callable[..., Path]


@pytest.fixture
def write_checkpoint(tmp_path: Path) -> WriteCheckpoint:
    """Write ``{name: tensor}`` as ``model.safetensors`` in a fresh directory."""
    counter = iter(range(1_000_000))

    def write(tensors: dict[str, torch.Tensor], config: dict[str, object] | None = None) -> Path:
        folder = tmp_path / f"ckpt{next(counter)}"
        folder.mkdir()
        save_file(
            {k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors")
        )
        if config is not None:
            (folder / "config.json").write_text(json.dumps(config))
        return folder

    return write


def small_settings(**overrides: object) -> dict[str, object]:
    """Fit settings for tests that are not about the defaults: small and fast."""
    return {"q_dim": 16, "pieces": 4, "steps": 60, **overrides}


@pytest.fixture(scope="session")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalHub]:
    """A local Hugging Face–compatible endpoint (tests/hubserver.py), for the real client."""
    server = LocalHub(tmp_path_factory.mktemp("hub-storage")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """A real ``mlflow server`` (sqlite backend, local artifacts, job execution off)."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server")).start()
    yield server
    server.stop()
