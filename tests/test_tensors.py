"""The streaming reader on files from real producers, and on broken ones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dynaudit.errors import CheckpointNotFound, CorruptCheckpoint, EmptyCheckpoint, PickleRefused
from dynaudit.tensors import Checkpoint, natural_key
from tests import producers


def _tiny_llama(tmp_path: Path, **save_kwargs: object) -> Path:
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=12,
        num_attention_heads=4, num_key_value_heads=2,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    out = tmp_path / "llama"
    model.save_pretrained(out, safe_serialization=True, **save_kwargs)
    return out


def test_natural_key_orders_numbers_as_numbers() -> None:
    names = ["layers.10.w", "layers.2.w", "layers.1.w", "layers.2.a"]
    assert sorted(names, key=natural_key) == [
        "layers.1.w", "layers.2.a", "layers.2.w", "layers.10.w"
    ]  # fmt: skip


def test_natural_key_takes_any_name() -> None:
    """Regression: a superscript between digits ("fc.1¹0.weight": "¹" is isdigit() but not a
    \\d digit) made int() fail, so opening a checkpoint with such a tensor or shard name was an
    internal error."""
    names = ["fc.1¹0.weight", "fc.2²", "layer②.w", "layers.١٠.w", "layers.9.w"]
    ordered = sorted(names, key=natural_key)
    assert ordered.index("layers.9.w") < ordered.index("layers.١٠.w")  # 9 < 10 in any script
    assert set(ordered) == set(names)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_reads_each_float_dtype_like_safetensors(tmp_path: Path, dtype: torch.dtype) -> None:
    tensors = {"b.weight": torch.randn(5, 3).to(dtype), "a.bias": torch.randn(5).to(dtype)}
    save_file(tensors, str(tmp_path / "x.safetensors"))
    reference = load_file(str(tmp_path / "x.safetensors"))
    with Checkpoint.open(tmp_path / "x.safetensors") as ckpt:
        assert ckpt.names() == ["a.bias", "b.weight"]
        for name, value in ckpt.iter_tensors():
            assert value.dtype == torch.float32
            assert torch.equal(value, reference[name].float())
            assert ckpt.tensors[name].dtype == {torch.float32: "F32", torch.float16: "F16",
                                                torch.bfloat16: "BF16"}[dtype]  # fmt: skip


def test_sharded_directory_from_save_pretrained(tmp_path: Path) -> None:
    single = _tiny_llama(tmp_path / "one")
    sharded = _tiny_llama(tmp_path / "many", max_shard_size="40KB")
    assert (sharded / "model.safetensors.index.json").exists()
    with Checkpoint.open(single) as a, Checkpoint.open(sharded) as b:
        assert len(b.files) > 2
        assert a.names() == b.names()
        assert a.config is not None and a.config["model_type"] == "llama"
        for name in a.names():
            assert torch.equal(a.read(name), b.read(name))
        # every weight file present: the shards and their index
        assert set(b.fingerprint()) == {f.name for f in b.files} | {"model.safetensors.index.json"}
        assert a.names().index("model.layers.2.mlp.down_proj.weight") < a.names().index(
            "model.layers.10.mlp.down_proj.weight"
        )


def test_header_inspection_reads_no_tensor_data(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    save_file({"w": torch.zeros(64, 64)}, str(path))
    with Checkpoint.open(path) as ckpt:
        assert ckpt.tensors["w"].shape == (64, 64)
        assert ckpt._maps == {}  # nothing mapped until a tensor is read


def test_fingerprint_is_sha256_of_the_file(tmp_path: Path) -> None:
    import hashlib

    path = tmp_path / "x.safetensors"
    save_file({"w": torch.ones(3, 3)}, str(path))
    with Checkpoint.open(path) as ckpt:
        assert ckpt.fingerprint() == {
            "x.safetensors": hashlib.sha256(path.read_bytes()).hexdigest()
        }


@pytest.mark.parametrize(
    ("header", "data", "problem"),
    [
        ({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}, b"\0" * 8, "outside"),
        ({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}}, b"\0" * 16, "needs"),
        ({"w": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 2]}}, b"\0" * 2, "dtype"),
        ({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4, "shape"),
        (
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
            },
            b"\0" * 12,
            "overlap",
        ),
        ({"w": [1, 2]}, b"", "not an object"),
    ],
)
def test_malformed_headers_are_corrupt(
    tmp_path: Path, header: dict[str, object], data: bytes, problem: str
) -> None:
    path = producers.raw_safetensors(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(CorruptCheckpoint, match=problem):
        Checkpoint.open(path)


def test_truncated_and_foreign_files_are_corrupt(tmp_path: Path) -> None:
    good = tmp_path / "good.safetensors"
    save_file({"w": torch.randn(32, 32)}, str(good))
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(CorruptCheckpoint, match="truncated"):
        Checkpoint.open(truncated)
    text = tmp_path / "notes.safetensors"
    text.write_text("this is not a checkpoint at all, just some words\n")
    with pytest.raises(CorruptCheckpoint, match="not a safetensors file"):
        Checkpoint.open(text)
    tiny = tmp_path / "tiny.safetensors"
    tiny.write_bytes(b"\1\2")
    with pytest.raises(CorruptCheckpoint, match="only 2 bytes"):
        Checkpoint.open(tiny)


def test_missing_empty_and_pickle_sources(tmp_path: Path) -> None:
    with pytest.raises(CheckpointNotFound):
        Checkpoint.open(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(EmptyCheckpoint):
        Checkpoint.open(tmp_path / "empty")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    torch.save({"w": torch.ones(2)}, pickled / "pytorch_model.bin")
    with pytest.raises(PickleRefused, match=r"pytorch_model\.bin"):
        Checkpoint.open(pickled)
    with pytest.raises(PickleRefused):
        Checkpoint.open(pickled / "pytorch_model.bin")


@pytest.mark.parametrize(
    ("weight_map", "problem"),
    [
        ({"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"},
         "missing"),
        ({"a": "../outside.safetensors"}, "outside the checkpoint directory"),
        ({"a": "/etc/passwd"}, "outside the checkpoint directory"),
        ({"a": "model-00001-of-00002.safetensors", "zz": "model-00001-of-00002.safetensors"},
         "not in shard"),
    ],
)  # fmt: skip
def test_bad_indexes_are_corrupt(tmp_path: Path, weight_map: dict[str, str], problem: str) -> None:
    (tmp_path / "outside.safetensors").write_bytes(b"")
    with pytest.raises(CorruptCheckpoint, match=problem):
        Checkpoint.open(producers.sharded_index(tmp_path, weight_map))


def test_symlinked_shards_open_like_the_hugging_face_cache(tmp_path: Path) -> None:
    """The HF cache keeps shards as symlinks into ../../blobs; an index naming them is fine
    (the escape check is on the names, not on where links lead)."""
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    save_file({"a": torch.ones(2, 2)}, str(blobs / "0123abcd"))
    snapshot = tmp_path / "snapshots" / "commit"
    snapshot.mkdir(parents=True)
    (snapshot / "model-00001-of-00001.safetensors").symlink_to("../../blobs/0123abcd")
    (snapshot / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "model-00001-of-00001.safetensors"}})
    )
    with Checkpoint.open(snapshot) as checkpoint:
        assert checkpoint.read("a").sum().item() == 4
