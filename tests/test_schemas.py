"""The format contract (issue 20, SPEC §8 "Formats"): every JSON output is versioned, its JSON
Schema ships in the package and matches the models, the schemas validate the golden and real
outputs, and readers take a newer minor version (unknown fields dropped with one warning) but
refuse a newer major version in one line."""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import shutil
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import torch

import dynaudit
from dynaudit.baseline_store import load_baseline
from dynaudit.cli import main
from dynaudit.errors import BaselineError, InputError
from dynaudit.schema import (
    BASELINE_FORMAT,
    Baseline,
    FamilyInfo,
    LayerResult,
    Report,
    SkippedLayer,
    SourceInfo,
    Spread,
    read_report,
    summarize,
)
from dynaudit.schemas import FORMATS, schema_text
from dynaudit.schemas.generate import models, render, write

GOLDEN = Path(__file__).parent / "golden"
FIT: dict[str, Any] = {"q_dim": 8, "pieces": 2, "steps": 20, "warm_steps": 10, "seeds": 2}


def validator(name: str) -> jsonschema.Draft202012Validator:
    schema = json.loads(schema_text(name))
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def golden(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((GOLDEN / name).read_text(encoding="utf-8"))
    return data


def sample_measure_report() -> Report:
    """A measure report with every kind of layer entry: measured, with a spread, sampled
    (block), null metrics with a reason, and skipped."""
    layers = [
        LayerResult(
            name="model.layers.0.mlp.up_proj.weight", type="mlp_up", depth=0, group="bottom",
            shape=[64, 16], matrices=1, neurons=80, q_dim=32, steps=150, discrepancy=0.21,
            mean_distance=1.9, fidelity=0.62, scale=0.05, scale_source="self",
            spread=Spread(seeds=3, discrepancy_std=0.01, mean_distance_std=0.02, relative=0.0105),
            digest="0" * 64, seconds=0.5,
        ),
        LayerResult(
            name="model.layers.1.mlp.up_proj.weight", type="mlp_up", depth=1, group="top",
            shape=[4096, 1024], matrices=1, neurons=512, block=[256, 256], q_dim=32, steps=150,
            discrepancy=0.3, mean_distance=2.1, fidelity=0.55, scale=0.04,
            scale_source="reference", seconds=0.7,
        ),
        LayerResult(
            name="model.layers.1.self_attn.q_proj.weight", type="query", depth=1, group="top",
            shape=[16, 16], matrices=1, neurons=32, q_dim=32, steps=150, discrepancy=None,
            mean_distance=None, fidelity=None, scale=None, scale_source="self",
            reason="all zeros",
        ),
    ]  # fmt: skip
    return Report(
        tool={"name": "dynaudit", "version": "0.0.0-golden"},
        source=SourceInfo(
            uri="hf://org/model@v1", path="/cache/x", revision="abc", files={"m": "f" * 64}
        ),
        family=FamilyInfo(name="llama", confidence=1.0, detected_by="config.json", depth_note=""),
        settings={"q_dim": 32, "pieces": 4, "steps": 150, "device": "cpu", "threads": 1},
        layers=[*layers, SkippedLayer(name="model.norm.weight", skipped="not a matrix")],
        summary=summarize(layers),
        created_at="2026-01-01T00:00:00+00:00",
        host="golden",
        seconds=1.5,
    )


def test_the_measure_golden() -> None:
    """Golden file of a measure report (check.json's is in test_check_reports.py); regenerate
    with DYNAUDIT_REGEN_GOLDEN=1 after a deliberate format change."""
    text = sample_measure_report().model_dump_json(indent=2) + "\n"
    path = GOLDEN / "measure.json"
    if os.environ.get("DYNAUDIT_REGEN_GOLDEN") == "1":
        path.write_bytes(text.encode("utf-8"))
    assert text == path.read_bytes().decode("utf-8"), "review, then DYNAUDIT_REGEN_GOLDEN=1"


# -- the shipped schemas --------------------------------------------------------------------


def test_shipped_schemas_are_what_the_models_generate() -> None:
    """A model changed without `python -m dynaudit.schemas` fails here."""
    shipped = {p.name for p in resources.files("dynaudit.schemas").iterdir()}
    assert {n for n in shipped if n.endswith(".schema.json")} == {
        f"{name}.schema.json" for name in FORMATS
    }
    for name in FORMATS:
        assert schema_text(name) == render(name), f"{name}: run python -m dynaudit.schemas"


def test_the_generator_writes_what_ships(tmp_path: Path) -> None:
    written = write(tmp_path / "out")
    assert [p.name for p in written] == [f"{name}.schema.json" for name in FORMATS]
    for path, name in zip(written, FORMATS, strict=True):
        assert path.read_text(encoding="utf-8") == schema_text(name)


def test_every_model_writes_its_formats_version() -> None:
    """The numbers in FORMATS are the ones the models write (and the baseline loader reads)."""
    assert FORMATS["baseline"].major == BASELINE_FORMAT
    for name, model in models().items():
        fmt = FORMATS[name]
        fields = model.model_fields
        assert fields[fmt.major_key].annotation.__args__ == (fmt.major,)  # type: ignore[union-attr]
        assert fields[fmt.major_key].default == fmt.major
        assert fields[fmt.minor_key].default == 0  # the lowest minor that reads a document


@pytest.mark.parametrize(("name", "file"), [("check", "check.json"), ("measure", "measure.json")])
def test_the_schemas_validate_the_golden_reports(name: str, file: str) -> None:
    schema = validator(name)
    data = golden(file)
    schema.validate(data)
    newer_minor = {**data, "schema_minor": 1, "a_new_field": [1]}
    schema.validate(newer_minor)  # the schema accepts what the readers accept
    for wrong in ({**data, "schema_version": 2}, {**data, "source": "none"}):
        with pytest.raises(jsonschema.ValidationError):
            schema.validate(wrong)
    other = validator("measure" if name == "check" else "check")
    with pytest.raises(jsonschema.ValidationError):
        other.validate(data)  # a check report is not a measure report, and the reverse


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two small linear layers (generic family): cheap to inspect, measure and baseline."""
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("tiny")
    generator = torch.Generator().manual_seed(0)
    save_file(
        {
            "fc1.weight": torch.randn(12, 8, generator=generator),
            "fc2.weight": torch.randn(6, 12, generator=generator),
            "fc2.bias": torch.zeros(6),
        },
        str(folder / "model.safetensors"),
    )
    return folder


@pytest.fixture(scope="module")
def stored(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("baselines") / "base"
    dynaudit.baseline(tiny, out, **FIT)
    return out


def test_real_outputs_validate_against_their_schemas(tiny: Path, stored: Path) -> None:
    """What the library really writes: an inspection (`inspect --json`), a measure report, a
    baseline's baseline.json and a check report."""
    inspection = json.loads(dynaudit.inspect(tiny).model_dump_json(indent=2))
    assert inspection["schema_version"] == 1 and "schema_minor" not in inspection
    validator("inspect").validate(inspection)
    report = dynaudit.measure(tiny, cache=False, **FIT)
    validator("measure").validate(json.loads(report.model_dump_json()))
    baseline = json.loads((stored / "baseline.json").read_text(encoding="utf-8"))
    assert baseline["format_version"] == 1 and "format_minor" not in baseline
    validator("baseline").validate(baseline)
    checked = dynaudit.check(tiny, stored, cache=False)
    validator("check").validate(json.loads(checked.model_dump_json()))


# -- readers: newer minor welcome, newer major refused ---------------------------------------


FUTURE_MINOR = 9  # a minor version no release has written yet


def with_future_fields(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` as a newer minor version might write it: new fields at the top, in a nested
    object, in every list entry (of a union: measured and skipped layers) and in dict values."""
    newer = copy.deepcopy(data)
    newer["schema_minor"] = FUTURE_MINOR
    newer["future_top"] = {"anything": [1, 2]}
    newer["source"]["future_source"] = "x"
    layers = newer["comparison"]["layers"] if "comparison" in newer else newer["layers"]
    for layer in layers:
        layer["future_layer"] = 1.0
    if "summary" in newer:
        for aggregate in newer["summary"]["groups"].values():
            aggregate["future_aggregate"] = None
    return newer


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize("file", ["check.json", "measure.json"])
def test_a_newer_minor_version_is_read_dropping_unknown_fields_with_one_warning(
    file: str, caplog: pytest.LogCaptureFixture
) -> None:
    data = golden(file)
    expected = read_report(data, file)
    assert not warnings_of(caplog)
    read = read_report(with_future_fields(data), file)
    assert read.model_copy(update={"schema_minor": 0}) == expected
    assert read.schema_minor == FUTURE_MINOR
    (warning,) = warnings_of(caplog)
    assert warning.startswith(f"{file}: ignored fields this dynaudit does not know")
    kind = "check report" if file == "check.json" else "measure report"
    reads = FORMATS["check" if file == "check.json" else "measure"].minor
    assert f"({kind} 1.{FUTURE_MINOR}, reads 1.{reads})" in warning
    layers = "comparison.layers[*]" if file == "check.json" else "layers[*]"
    for field in ("future_top", "source.future_source", f"{layers}.future_layer"):
        assert field in warning
    assert warning.count("future_layer") == 1  # named once, not once per layer
    assert ("summary.groups[*].future_aggregate" in warning) == (file == "measure.json")


def test_a_skipped_layer_keeps_its_kind_when_fields_are_dropped() -> None:
    """A union (measured | skipped layer) is stripped as the member the entry is meant as."""
    data = with_future_fields(golden("measure.json"))
    read = read_report(data, "r.json")
    assert isinstance(read, Report)
    assert [layer.name for layer in read.skipped] == ["model.norm.weight"]
    assert len(read.measured) == 3


def test_a_newer_minor_version_without_new_fields_reads_silently(
    caplog: pytest.LogCaptureFixture,
) -> None:
    data = {**golden("check.json"), "schema_minor": 7}
    assert read_report(data, "c.json").schema_minor == 7
    assert not warnings_of(caplog)


def test_minor_0_is_not_written_so_older_readers_still_read_it() -> None:
    """Minor 0 is what every report before minor versions was: byte for byte the same JSON
    (the dynaudit releases from before the contract refuse unknown fields). A newer minor is
    written."""
    data = golden("check.json")
    assert "schema_minor" not in data and read_report(data, "c.json").schema_minor == 0
    report = read_report({**data, "schema_minor": 2}, "c.json")
    assert json.loads(report.model_dump_json())["schema_minor"] == 2


@pytest.mark.parametrize("file", ["check.json", "measure.json"])
def test_a_newer_major_version_is_refused_in_one_line(file: str) -> None:
    data = with_future_fields(golden(file))
    data["schema_version"] = 2
    data["layers"] = "a layout this dynaudit cannot read"
    with pytest.raises(InputError) as caught:
        read_report(data, f"in/{file}")
    kind = "check report" if file == "check.json" else "measure report"
    assert caught.value.message == (
        f"in/{file}: {kind} schema 2 is newer than this dynaudit (reads 1.x); upgrade dynaudit"
    )
    assert caught.value.exit_code == 3


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ([1, 2], "not a dynaudit measure report (not a JSON object)"),
        ({"schema_version": 1}, "not a valid dynaudit measure report (tool: Field required)"),
        ({**golden("check.json"), "verdict": {"verdict": "maybe"}}, "verdict.verdict: Input"),
    ],
)
def test_what_is_not_a_report_is_an_input_error(data: object, needle: str) -> None:
    with pytest.raises(InputError, match=r"^r\.json: ") as caught:
        read_report(data, "r.json")
    assert needle in caught.value.message and "\n" not in caught.value.message


def test_many_dropped_fields_are_named_up_to_a_limit(caplog: pytest.LogCaptureFixture) -> None:
    data = {**golden("check.json"), **{f"f{i:02d}": i for i in range(20)}}
    read_report(data, "c.json")
    (warning,) = warnings_of(caplog)
    assert "f11" in warning and "f12" not in warning and warning.endswith(" and 8 more")


# -- the baseline reader ---------------------------------------------------------------------


def edit_baseline(baseline: Path, data: dict[str, Any]) -> None:
    """Rewrite baseline.json and its manifest line, as a newer dynaudit would have written it."""
    (baseline / "baseline.json").write_text(json.dumps(data), encoding="utf-8")
    manifest = json.loads((baseline / "manifest.json").read_text(encoding="utf-8"))
    manifest["baseline.json"] = hashlib.sha256(
        (baseline / "baseline.json").read_bytes()
    ).hexdigest()
    (baseline / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")


def future_baseline(stored: Path, tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    copied = Path(shutil.copytree(stored, tmp_path / "baseline"))
    data = json.loads((copied / "baseline.json").read_text(encoding="utf-8"))
    data["format_minor"] = 1
    data["future_top"] = True
    for layer in data["layers"]:
        layer["future_layer"] = "x"
    data["report"]["future_report"] = 1
    data["report"]["layers"][0]["future_report_layer"] = 1
    data["settings"]["future_setting"] = 2  # a free-form table: was "invalid fit settings"
    return copied, data


def test_a_baseline_of_a_newer_minor_loads_with_one_warning(
    stored: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    copied, data = future_baseline(stored, tmp_path)
    edit_baseline(copied, data)
    loaded = load_baseline(copied)
    assert loaded.format_minor == 1
    assert loaded.model_copy(update={"format_minor": 0}) == load_baseline(stored)
    (warning,) = warnings_of(caplog)
    assert "baseline.json: ignored fields this dynaudit does not know (baseline 1.1" in warning
    for field in ("future_top", "layers[*].future_layer", "report.future_report",
                  "report.layers[*].future_report_layer", "settings.future_setting"):  # fmt: skip
        assert field in warning


def test_a_baseline_of_a_newer_major_is_refused(stored: Path, tmp_path: Path) -> None:
    copied, data = future_baseline(stored, tmp_path)
    edit_baseline(copied, {**data, "format_version": 2})
    with pytest.raises(BaselineError, match="baseline format 2 is newer than this dynaudit"):
        load_baseline(copied)


def test_check_warns_once_on_stderr_and_keeps_its_verdict(
    tiny: Path, stored: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Through the CLI: one warning line (a crafted field name cannot break it) and the
    verdict's exit code."""
    copied, data = future_baseline(stored, tmp_path)
    data["evil\n::error::pwned\x1b[2K"] = 1
    edit_baseline(copied, data)
    capsys.readouterr()
    code = main(["check", str(tiny), "--baseline", str(copied), "--no-cache"])
    err = capsys.readouterr().err
    assert code == 0, err
    warnings = [line for line in err.splitlines() if "ignored fields" in line]
    assert len(warnings) == 1, err
    assert warnings[0].startswith("dynaudit: warning: ") and "\x1b" not in err
    assert "evil\\n::error::pwned\\x1b[2K" in warnings[0]
    assert not any(line.startswith("::error::") for line in err.splitlines())


def test_a_baseline_model_is_strict_when_written() -> None:
    """Leniency is the readers'; the models still refuse an unknown field."""
    with pytest.raises(ValueError, match="future"):
        Baseline.model_validate({"future": 1})


def test_writing_a_report_refuses_unknown_fields() -> None:
    data = golden("measure.json")
    with pytest.raises(ValueError, match="Extra inputs are not permitted"):
        Report.model_validate({**data, "future": 1})
