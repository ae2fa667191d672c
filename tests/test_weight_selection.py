"""One rule for which files are the weights: the one transformers' ``from_pretrained`` follows
(``model.safetensors`` before ``model.safetensors.index.json``), for local directories and the
Hub alike; the fingerprint covers every weight file present; a check never passes weights the
loader would read and the audit did not."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import dynaudit
from dynaudit.api import _require_audited
from dynaudit.cli import main
from dynaudit.errors import InputError, UnauditedWeights
from dynaudit.schema import CheckReport, Report
from dynaudit.sources import SourceOptions
from dynaudit.tensors import Checkpoint, select_weights, sha256_file
from tests.hubserver import LocalHub

FAST = {"q_dim": 16, "pieces": 4, "steps": 30}
FAST_FLAGS = ["--q-dim", "16", "--pieces", "4", "--steps", "30"]
NAN_LAYER = "model.layers.0.self_attn.q_proj.weight"
ZERO_LAYER = "model.layers.0.mlp.down_proj.weight"
SHARDS = [f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)]
INDEX = "model.safetensors.index.json"


# -- the rule, as a table ---------------------------------------------------------------


def _no_index(name: str) -> list[str]:
    raise AssertionError(f"{name} must not be read")


@pytest.mark.parametrize(
    ("names", "files", "index", "pickle", "unaudited"),
    [
        # transformers checks model.safetensors before the index
        ([INDEX, *SHARDS, "model.safetensors"], ["model.safetensors"], None, False,
         [*SHARDS, INDEX]),
        ([INDEX, *SHARDS], SHARDS, INDEX, False, []),
        (["model.safetensors", "pytorch_model.bin"], ["model.safetensors"], None, False,
         ["pytorch_model.bin"]),
        # safetensors of any kind win over pickles; pickles win over stray .safetensors
        (["pytorch_model.bin", "stray.safetensors"], ["pytorch_model.bin"], None, True,
         ["stray.safetensors"]),
        (["pytorch_model.bin.index.json", "pytorch_model-00001-of-00001.bin"],
         ["pytorch_model-00001-of-00001.bin"], "pytorch_model.bin.index.json", True, []),
        # beyond transformers: every top-level .safetensors, else every pickle
        (["b.safetensors", "a.safetensors", "sub/c.safetensors"], ["a.safetensors",
         "b.safetensors"], None, False, []),
        (["model.pt", "training_args.bin"], ["model.pt", "training_args.bin"], None, True, []),
        # a variant is not loaded by default: present, not audited
        (["model.safetensors", "model.fp16.safetensors"], ["model.safetensors"], None, False,
         ["model.fp16.safetensors"]),
        (["config.json", "README.md"], [], None, False, []),
    ],
)  # fmt: skip
def test_the_rule(
    names: list[str], files: list[str], index: str | None, pickle: bool, unaudited: list[str]
) -> None:
    def shards(name: str) -> list[str]:
        return [n for n in names if n.endswith((".safetensors", ".bin")) and "-of-" in n]

    chosen = select_weights(names, shards if index else _no_index)
    assert list(chosen.files) == files
    assert (chosen.index, chosen.pickle) == (index, pickle)
    assert sorted(chosen.unaudited) == sorted(unaudited)
    assert (chosen.note is None) == (not unaudited)


def test_config_transformers_weights_wins_like_in_transformers() -> None:
    names = ["model.safetensors", "other.safetensors", "config.json"]
    chosen = select_weights(names, _no_index, explicit="other.safetensors")
    assert chosen.files == ("other.safetensors",) and chosen.unaudited == ("model.safetensors",)
    with pytest.raises(InputError, match="transformers_weights"):
        select_weights(names, _no_index, explicit="missing.safetensors")


# -- the ambiguous directory ------------------------------------------------------------


def _llama() -> torch.nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1,
    )  # fmt: skip
    torch.manual_seed(0)
    model: torch.nn.Module = transformers.LlamaForCausalLM(config)
    return model


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``healthy``: a sharded save_pretrained; ``ambiguous``: the same plus a
    ``model.safetensors`` with a NaN q_proj and an all-zero down_proj; ``both_healthy``: the
    shards plus a healthy ``model.safetensors``."""
    root = tmp_path_factory.mktemp("selection")
    model = _llama()
    out = {}
    for name in ("healthy", "ambiguous", "both_healthy"):
        model.save_pretrained(root / name, max_shard_size="3KB")  # type: ignore[operator]
        out[name] = root / name
    assert (root / "healthy" / INDEX).exists() and len(list(root.glob("healthy/model-*"))) > 2
    damaged = _state(model)
    damaged[NAN_LAYER][0, 0] = float("nan")
    damaged[ZERO_LAYER].zero_()
    save_file(damaged, str(root / "ambiguous" / "model.safetensors"), metadata={"format": "pt"})
    save_file(_state(model), str(root / "both_healthy" / "model.safetensors"))
    return out


@pytest.fixture(scope="module")
def healthy_baseline(dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("baseline") / "healthy"
    code = main(["baseline", str(dirs["healthy"]), "--out", str(out), "--seeds", "1",
                 *FAST_FLAGS])  # fmt: skip
    assert code == 0
    return out


def test_transformers_loads_the_damaged_model_safetensors(dirs: dict[str, Path]) -> None:
    """The premise, on the installed transformers: from_pretrained reads model.safetensors."""
    transformers = pytest.importorskip("transformers")
    loaded = transformers.LlamaForCausalLM.from_pretrained(dirs["ambiguous"])
    assert torch.isnan(loaded.state_dict()[NAN_LAYER]).any()
    with Checkpoint.open(dirs["ambiguous"]) as checkpoint:
        assert [f.name for f in checkpoint.files] == ["model.safetensors"]
        assert torch.isnan(checkpoint.read(NAN_LAYER)).any()


def test_measure_audits_what_transformers_loads(
    dirs: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["measure", str(dirs["ambiguous"]), *FAST_FLAGS, "--no-cache", "--quiet"])
    err = capsys.readouterr().err
    assert code == 1 and NAN_LAYER in err, err


def test_check_does_not_pass_the_ambiguous_directory(
    dirs: dict[str, Path], healthy_baseline: Path, tmp_path: Path
) -> None:
    out = tmp_path / "check.json"
    code = main(["check", str(dirs["ambiguous"]), "--baseline", str(healthy_baseline),
                 "--json", str(out), "--quiet"])  # fmt: skip
    assert code == 1
    report = CheckReport.model_validate_json(out.read_text())
    assert not report.verdict.passed
    assert NAN_LAYER in " ".join(report.verdict.reasons)
    assert ZERO_LAYER in " ".join(report.verdict.reasons)
    # the report says which files were audited, and why
    note = report.source.selection
    assert note is not None and note.startswith("audited model.safetensors")
    assert INDEX in note and "not audited" in note


def test_the_fingerprint_covers_every_weight_file(dirs: dict[str, Path], tmp_path: Path) -> None:
    folder = tmp_path / "copy"
    folder.mkdir()
    for file in dirs["both_healthy"].iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    with Checkpoint.open(folder) as checkpoint:
        fingerprint = checkpoint.fingerprint()
    present = {p.name for p in folder.iterdir() if p.name.endswith((".safetensors", INDEX))}
    assert set(fingerprint) == present
    first = dynaudit.measure(folder, **FAST)
    assert first.source.files == fingerprint and first.source.selection is not None
    # change a shard the audit does not read: not a cache hit any more
    shard = sorted(folder.glob("model-*.safetensors"))[-1]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    again = dynaudit.measure(folder, **FAST)
    assert again.cache is not None and not again.cache.hit
    assert again.source.files[shard.name] == sha256_file(shard) != fingerprint[shard.name]


def test_an_unambiguous_report_has_no_selection_note(dirs: dict[str, Path]) -> None:
    report = dynaudit.measure(dirs["healthy"], cache=False, **FAST)
    assert report.source.selection is None
    assert "selection" not in json.loads(report.model_dump_json())["source"]


def test_check_refuses_weights_the_loader_would_read_and_the_audit_did_not(
    dirs: dict[str, Path], tmp_path: Path
) -> None:
    """The guard: a model.safetensors that appears after the shards were chosen (a directory
    written while it is audited) is named, exit 3."""
    folder = tmp_path / "growing"
    folder.mkdir()
    for file in dirs["healthy"].iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    with Checkpoint.open(folder) as checkpoint:
        _require_audited(checkpoint, str(folder))  # the rule and the loader agree
        (folder / "model.safetensors").write_bytes(
            (dirs["ambiguous"] / "model.safetensors").read_bytes()
        )
        with pytest.raises(UnauditedWeights, match=r"model\.safetensors") as caught:
            _require_audited(checkpoint, str(folder))
    assert caught.value.exit_code == 3


def test_pickles_win_over_stray_safetensors_like_in_transformers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "mixed"
    folder.mkdir()
    torch.save({"fc.weight": torch.randn(8, 8)}, folder / "pytorch_model.bin")
    save_file({"fc.weight": torch.randn(8, 8)}, str(folder / "stray.safetensors"))
    assert main(["measure", str(folder), *FAST_FLAGS, "--quiet"]) == 3
    err = capsys.readouterr().err
    assert "pytorch_model.bin" in err and len(err.strip().splitlines()) == 1


def test_config_transformers_weights_is_followed(
    dirs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "explicit"
    folder.mkdir()
    for file in dirs["ambiguous"].iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "transformers_weights": INDEX}))
    with Checkpoint.open(folder) as checkpoint:
        assert [f.name for f in checkpoint.files] == sorted(
            p.name for p in folder.glob("model-*.safetensors")
        )
    (folder / "config.json").write_text(
        json.dumps({**config, "transformers_weights": "x.safetensors"})
    )
    assert main(["measure", str(folder), *FAST_FLAGS, "--quiet"]) == 3
    assert "transformers_weights" in capsys.readouterr().err


# -- the same through the Hub -----------------------------------------------------------


def test_the_hub_path_audits_model_safetensors(
    hub: LocalHub, dirs: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    hub.add("org/ambiguous", dirs["ambiguous"])
    start = len(hub.requests)
    code = main(["measure", "hf://org/ambiguous", "--hf-endpoint", hub.url, *FAST_FLAGS,
                 "--no-cache", "--quiet"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 1 and NAN_LAYER in err, err
    fetched = {r.path.rsplit("/", 1)[-1] for r in hub.requests[start:] if r.body_bytes}
    assert "model.safetensors" in fetched and not fetched & set(SHARDS)


def test_the_hub_report_names_and_fingerprints_the_unread_shards(
    hub: LocalHub, dirs: dict[str, Path]
) -> None:
    hub.add("org/both-healthy", dirs["both_healthy"])
    report: Report = dynaudit.measure(
        "hf://org/both-healthy", sources=SourceOptions(hf_endpoint=hub.url), cache=False, **FAST
    )
    local = dirs["both_healthy"]
    shards = sorted(p.name for p in local.glob("model-*.safetensors"))
    assert report.source.selection is not None and shards[0] in report.source.selection
    # the shards were not downloaded: their sha256 is the one the Hub vouches for
    assert {name: report.source.files[name] for name in shards} == {
        name: sha256_file(local / name) for name in shards
    }
    assert report.source.files["model.safetensors"] == sha256_file(local / "model.safetensors")
