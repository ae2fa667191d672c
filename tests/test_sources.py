"""Sources through their real clients: the Hugging Face Hub (huggingface_hub against a local
endpoint), MLflow (a real ``mlflow server``), and the result cache."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import dynaudit
from dynaudit.schema import Report
from dynaudit.sources import SourceOptions
from tests.cli import run_cli
from tests.conftest import figures
from tests.hubserver import LocalHub
from tests.mlflowserver import MlflowServer, free_port

FAST = {"q_dim": 16, "pieces": 4, "steps": 60}
FAST_FLAGS = ["--q-dim", "16", "--pieces", "4", "--steps", "60"]
TOKEN = "hf_test_secret_0123456789abcdef"
ERROR_SECONDS = 15


def process_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """A real ``python -m dynaudit``: for variables read when huggingface_hub is imported."""
    return subprocess.run(
        [sys.executable, "-m", "dynaudit", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **env},
    )


@pytest.fixture(scope="session")
def local_numbers(sharded_llama: Path) -> dict[str, Any]:
    return figures(dynaudit.measure(sharded_llama, cache=False, **FAST))


@pytest.fixture(scope="session")
def published(hub: LocalHub, sharded_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """org/tiny-llama (tag v1), a gated copy, a pickle-only repo and one with a missing shard;
    returns the commit of v1."""
    commit = hub.add("org/tiny-llama", sharded_llama, revisions=("main", "v1"))
    hub.add("org/gated-llama", sharded_llama, token=TOKEN, gated=True)
    pickles = tmp_path_factory.mktemp("pickle-only")
    (pickles / "pytorch_model.bin").write_bytes(b"pickle")
    (pickles / "config.json").write_text("{}")
    hub.add("org/pickle-only", pickles)
    broken = tmp_path_factory.mktemp("missing-shard")
    for file in sharded_llama.iterdir():
        shutil.copy(file, broken / file.name)
    next(broken.glob("model-00002-*.safetensors")).unlink()
    hub.add("org/missing-shard", broken)
    return commit


# -- Hugging Face Hub -------------------------------------------------------------------


def test_revision_flag_pins_the_hub_revision(hub: LocalHub, published: str) -> None:
    """``--revision REV`` is ``hf://org/name@REV``: the report names the pinned URI and commit;
    a different revision in the URI is one line, exit 2, before anything is downloaded."""
    proc = run_cli("inspect", "hf://org/tiny-llama", "--revision", "v1", "--hf-endpoint", hub.url,
               "--json", "-")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    found = json.loads(proc.stdout)
    assert found["uri"] == "hf://org/tiny-llama@v1"
    start = len(hub.requests)
    clash = run_cli("measure", "hf://org/tiny-llama@main", "--revision", "v1", "--hf-endpoint",
                hub.url)  # fmt: skip
    assert clash.returncode == 2, clash.stderr
    assert len(clash.stderr.strip().splitlines()) == 1 and "differs" in clash.stderr
    assert len(hub.requests) == start


def test_hub_measure_equals_local(
    hub: LocalHub, published: str, local_numbers: dict[str, Any], tmp_path: Path
) -> None:
    out = tmp_path / "hub.json"
    start = len(hub.requests)
    proc = run_cli(
        "measure", "hf://org/tiny-llama@v1", "--hf-endpoint", hub.url, *FAST_FLAGS,
        "--json", str(out), "--quiet",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = Report.model_validate_json(out.read_text())
    assert figures(report) == local_numbers
    assert report.source.uri == "hf://org/tiny-llama@v1"
    assert report.source.revision == published
    downloaded = {
        r.path.rsplit("/", 1)[-1]
        for r in hub.requests[start:]
        if r.method == "GET" and r.body_bytes
    }
    shards = {f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)}
    assert downloaded == {"config.json", "model.safetensors.index.json", "README.md"} | shards
    assert not any("pytorch_model.bin" in r.path for r in hub.requests[start:])


def test_hub_inspect_reads_only_the_headers(
    hub: LocalHub, published: str, sharded_llama: Path
) -> None:
    from dynaudit.api import inspect

    before = hub.served(".safetensors")
    remote = inspect("org/tiny-llama", sources=SourceOptions(hf_endpoint=hub.url))
    served = hub.served(".safetensors") - before
    weights = sum(f.stat().st_size for f in sharded_llama.glob("*.safetensors"))
    assert served <= 4 * 64 * 1024 < weights
    local = inspect(sharded_llama)
    assert remote.layers == local.layers and remote.structure == local.structure
    assert remote.uri == "org/tiny-llama" and len(remote.files) == 4


def test_a_mistyped_local_path_is_not_sent_to_the_hub(hub: LocalHub, tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    start = len(hub.requests)
    for typo in ("out/model.safetensors", "out/modle", "ckpt/model.safetensors"):
        proc = run_cli("measure", typo, "--hf-endpoint", hub.url, cwd=tmp_path)
        assert proc.returncode == 3 and "no such file or directory" in proc.stderr, proc.stderr
    assert len(hub.requests) == start


def test_a_local_path_wins_over_a_repo_id(
    hub: LocalHub, published: str, sharded_llama: Path, tmp_path: Path
) -> None:
    shutil.copytree(sharded_llama, tmp_path / "org" / "tiny-llama")
    start = len(hub.requests)
    proc = run_cli(
        "measure", "org/tiny-llama", "--hf-endpoint", hub.url, *FAST_FLAGS, "--json", "r.json",
        "--quiet", cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert len(hub.requests) == start
    assert json.loads((tmp_path / "r.json").read_text())["source"]["revision"] is None


USAGE_ERRORS = {
    "hf://not a repo", "hf://org/two..dots", "hf://datasets/org/tiny-llama",
    "hf://org/tiny-llama/config.json",
}  # fmt: skip


@pytest.mark.parametrize(
    ("source", "extra", "needles"),
    [
        ("hf://org/no-such-repo", [], ["no repository 'org/no-such-repo'", "HF_TOKEN"]),
        ("org/no-such-repo", [], ["nor is it a local path"]),
        ("hf://org/tiny-llama@v9", [], ["no revision 'v9'"]),
        ("hf://org/missing-shard", [], ["names shard", "missing"]),
        ("hf://org/gated-llama", [], ["gated", "HF_TOKEN"]),
        ("hf://org/gated-llama", ["--hf-token", "hf_wrong"], ["gated"]),
        ("hf://org/pickle-only", [], ["pickle", "safetensors"]),
        ("hf://org/tiny-llama", ["--hf-endpoint", "http://127.0.0.1:{dead}"], ["cannot reach"]),
        ("hf://not a repo", [], ["hf://org/name"]),
        ("hf://org/two..dots", [], ["not a valid Hub repository id"]),
        ("hf://datasets/org/tiny-llama", [], ["a Hub dataset", "dynaudit audits model"]),
        ("hf://org/tiny-llama/no-such-folder", [], ["no folder 'no-such-folder'"]),
        ("hf://org/tiny-llama/config.json", [], ["is a file", "name the folder"]),
    ],
)
def test_hub_failures_are_one_line_exit_3(
    hub: LocalHub, published: str, source: str, extra: list[str], needles: list[str]
) -> None:
    extra = [e.format(dead=free_port()) for e in extra]
    endpoint = [] if "--hf-endpoint" in extra else ["--hf-endpoint", hub.url]
    started = time.monotonic()
    proc = run_cli("measure", source, *endpoint, *extra, *FAST_FLAGS)
    elapsed = time.monotonic() - started
    expected = 2 if source in USAGE_ERRORS else 3
    assert proc.returncode == expected, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert source in lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert elapsed < ERROR_SECONDS
    assert "hf_wrong" not in proc.stderr


def test_an_adapter_on_the_hub_merges_over_its_base_on_the_hub(
    hub: LocalHub, tmp_path: Path
) -> None:
    """The adapter's base_model_name_or_path names a Hub repo: fetched with the same options."""
    import torch

    from tests import producers
    from tests.test_adapters import make_adapter

    base = producers.llama(tmp_path / "base", dtype=torch.float32)
    adapter, merged = make_adapter(base, tmp_path)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "org/lora-base"
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    hub.add("org/lora-base", base)
    hub.add("org/lora", adapter)
    options = SourceOptions(hf_endpoint=hub.url)
    remote = dynaudit.measure("hf://org/lora", sources=options, cache=False, **FAST)
    local = dynaudit.measure(merged, cache=False, **FAST)
    assert len(remote.measured) == len(local.measured) == 29
    for ours, theirs in zip(remote.measured, local.measured, strict=True):
        assert ours.name == theirs.name
        assert ours.mean_distance == pytest.approx(theirs.mean_distance, rel=1e-4)
    assert any(name.startswith("adapter/") for name in remote.source.files)


def test_the_token_is_used_and_never_shown(hub: LocalHub, published: str, tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    proc = run_cli(
        "measure", "hf://org/gated-llama", "--hf-endpoint", hub.url, *FAST_FLAGS,
        "--json", str(out), "--markdown", str(tmp_path / "r.md"),
        env={"HF_TOKEN": TOKEN, "DYNAUDIT_DEBUG": "0"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    flag = run_cli(
        "measure", "hf://org/gated-llama", "--hf-endpoint", hub.url, "--hf-token", TOKEN,
        *FAST_FLAGS, "--no-cache", "--quiet",
    )  # fmt: skip
    assert flag.returncode == 0, flag.stderr
    cache = Path(os.environ["DYNAUDIT_CACHE_DIR"])
    texts = [proc.stdout, proc.stderr, flag.stdout, flag.stderr, out.read_text()]
    texts += [(tmp_path / "r.md").read_text()]
    texts += [p.read_text(errors="replace") for p in cache.rglob("*") if p.is_file()]
    assert not any(TOKEN in text for text in texts)


def test_hub_download_is_checked_against_the_hubs_sha256(
    hub: LocalHub, published: str, tmp_path: Path
) -> None:
    options = SourceOptions(hf_endpoint=hub.url)
    report = dynaudit.measure("hf://org/tiny-llama", sources=options, **FAST)
    shard = Path(report.source.path) / "model-00001-of-00004.safetensors"
    blob = shard.resolve()
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF  # same size, one flipped byte: the client's cache still trusts it
    blob.write_bytes(bytes(data))
    proc = run_cli("measure", "hf://org/tiny-llama", "--hf-endpoint", hub.url, *FAST_FLAGS)
    assert proc.returncode == 3, proc.stderr
    assert "does not match the sha256" in proc.stderr and "model-00001" in proc.stderr


def test_each_downloaded_file_is_hashed_once(
    hub: LocalHub, published: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: with the cache off, a download was hashed to verify it, then again to
    fingerprint it; with the cache on, `check` re-hashed what `measure` had memoised."""
    import dynaudit.tensors

    hashed: list[str] = []
    real = dynaudit.tensors.sha256_file

    def counting(path: Path) -> str:
        if Path(path).name.startswith("model-"):  # not the baseline's own files
            hashed.append(Path(path).name)
        return real(path)

    for module in ("dynaudit.tensors", "dynaudit.api", "dynaudit.cache", "dynaudit.sources.local"):
        monkeypatch.setattr(f"{module}.sha256_file", counting, raising=False)
    options = SourceOptions(hf_endpoint=hub.url)
    report = dynaudit.measure("hf://org/tiny-llama", sources=options, cache=False, **FAST)
    shards = sorted(name for name in report.source.files if name.startswith("model-"))
    assert sorted(hashed) == shards and len(hashed) == 4
    # the fingerprint covers every weight file: the pickle the Hub vouches for, never fetched
    others = {"model.safetensors.index.json", "pytorch_model.bin"}
    assert set(report.source.files) == {*shards, *others}
    hashed.clear()
    dynaudit.measure("hf://org/tiny-llama", sources=options, **FAST)
    first = list(hashed)
    hashed.clear()
    stored = Path(os.environ["DYNAUDIT_CACHE_DIR"]) / "baseline"
    dynaudit.baseline("hf://org/tiny-llama", stored, sources=options, seeds=1, **FAST)
    dynaudit.check("hf://org/tiny-llama", stored, sources=options)
    assert len(first) == 4 and hashed == []  # memoised by the first cached measure


def test_offline_mode_uses_the_populated_cache(
    hub: LocalHub, published: str, local_numbers: dict[str, Any], tmp_path: Path
) -> None:
    """HF_HUB_OFFLINE is read when huggingface_hub is imported: each run is a subprocess."""
    warm = {"HF_HOME": str(tmp_path / "warm")}
    uri = "hf://org/tiny-llama@v1"
    online = process_cli("measure", uri, "--hf-endpoint", hub.url, *FAST_FLAGS, "--quiet", env=warm)
    assert online.returncode == 0, online.stderr
    dead = f"http://127.0.0.1:{free_port()}"  # proves nothing is asked of the network
    out = tmp_path / "offline.json"
    offline = process_cli(
        "measure", "hf://org/tiny-llama@v1", "--hf-endpoint", dead, *FAST_FLAGS, "--no-cache",
        "--json", str(out), "--quiet", env={**warm, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert offline.returncode == 0, offline.stderr
    report = Report.model_validate_json(out.read_text())
    assert figures(report) == local_numbers and report.source.revision == published
    empty = process_cli(
        "measure", "hf://org/tiny-llama@v1", *FAST_FLAGS,
        env={"HF_HOME": str(tmp_path / "empty"), "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert empty.returncode == 3
    assert "HF_HUB_OFFLINE" in empty.stderr and len(empty.stderr.strip().splitlines()) == 1


@pytest.fixture(scope="session")
def trainer_run(
    hub: LocalHub, sharded_llama: Path, tmp_path_factory: pytest.TempPathFactory
) -> str:
    """org/trainer-run as a Trainer pushes it: a model card at the root, the weights in
    checkpoint-500/, published as main, a pull request (refs/pr/1) and a branch with a slash
    (feature/x); returns the commit."""
    folder = tmp_path_factory.mktemp("trainer-run")
    shutil.copytree(sharded_llama, folder / "checkpoint-500")
    (folder / "README.md").write_text("---\nbase_model: org/base\n---\n# a run\n")
    (folder / "training_args.bin").write_bytes(b"a pickle beside the checkpoints")
    return hub.add("org/trainer-run", folder, revisions=("main", "refs/pr/1", "feature/x"))


HF_FILE_SYSTEM_FORMS = [
    "hf://org/trainer-run",
    "hf://org/trainer-run/checkpoint-500",
    "hf://org/trainer-run@main/checkpoint-500",
    "hf://org/trainer-run@refs/pr/1/checkpoint-500",
    "hf://org/trainer-run@refs%2Fpr%2F1/checkpoint-500",
    "hf://org/trainer-run@feature%2Fx",
    "org/trainer-run@main/checkpoint-500",
]


def test_hub_uris_parse_like_hf_file_system(hub: LocalHub, trainer_run: str) -> None:
    """Regression: ``/checkpoint-500`` was refused and ``@main/sub`` read as revision
    "main/sub". Each form is compared with what huggingface_hub's own HfFileSystem makes of
    it, against the same endpoint."""
    from huggingface_hub import HfFileSystem

    from dynaudit.sources.hub import parse

    fs = HfFileSystem(endpoint=hub.url, skip_instance_cache=True)
    for uri in HF_FILE_SYSTEM_FORMS:
        theirs = fs.resolve_path(uri)
        ours = parse(uri)
        assert ours is not None, uri
        assert (ours.repo_id, ours.revision or "main", ours.subfolder) == (
            theirs.repo_id, theirs.revision, theirs.path_in_repo
        ), uri  # fmt: skip
    flagged = fs.resolve_path("hf://org/trainer-run/checkpoint-500", revision="refs/pr/1")
    ours = parse("hf://org/trainer-run/checkpoint-500", "refs/pr/1")
    assert ours is not None and (ours.revision, ours.subfolder) == (
        flagged.revision, flagged.path_in_repo
    )  # fmt: skip
    with pytest.raises(ValueError, match="not the same"):
        fs.resolve_path("hf://org/trainer-run@main/checkpoint-500", revision="refs/pr/1")
    with pytest.raises(dynaudit.DynauditError, match="differs from the revision 'main'"):
        parse("hf://org/trainer-run@main/checkpoint-500", "refs/pr/1")


def test_a_checkpoint_in_a_folder_of_a_repo(
    hub: LocalHub, trainer_run: str, sharded_llama: Path, local_numbers: dict[str, Any]
) -> None:
    """Only the folder's files are fetched; the weights equal the local ones, at the pull
    request's commit; its headers alone are read remotely the same way."""
    from dynaudit.api import inspect

    options = SourceOptions(hf_endpoint=hub.url)
    uri = "hf://org/trainer-run@refs%2Fpr%2F1/checkpoint-500"
    start = len(hub.requests)
    report = dynaudit.measure(uri, sources=options, cache=False, **FAST)
    assert figures(report) == local_numbers
    assert report.source.uri == uri and report.source.revision == trainer_run
    fetched = {r.path for r in hub.requests[start:] if r.method == "GET" and r.body_bytes}
    assert fetched and all("/checkpoint-500/" in path for path in fetched), fetched
    remote = inspect("hf://org/trainer-run/checkpoint-500", sources=options)
    local = inspect(sharded_llama)
    assert remote.layers == local.layers and len(remote.files) == 4


def test_a_folder_is_found_offline_in_the_cache(
    hub: LocalHub, trainer_run: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    from dynaudit.sources import resolve

    options = SourceOptions(hf_endpoint=hub.url)
    online = resolve("hf://org/trainer-run@feature%2Fx/checkpoint-500", options)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    offline = resolve("hf://org/trainer-run@feature%2Fx/checkpoint-500", options)
    assert offline.path == online.path and offline.path.name == "checkpoint-500"
    assert offline.revision == trainer_run
    with pytest.raises(dynaudit.DynauditError, match="HF_HUB_OFFLINE"):
        resolve("hf://org/trainer-run@feature%2Fx/checkpoint-900", options)


@pytest.mark.parametrize(
    ("source", "revision", "expected"),
    [
        ("hf://org/name", "v1", "hf://org/name@v1"),
        ("org/name/checkpoint-500", "refs/pr/1", "hf://org/name@refs/pr/1/checkpoint-500"),
        ("hf://org/name/sub", "feature/x", "hf://org/name@feature%2Fx/sub"),
        ("hf://org/name@refs%2Fpr%2F1", "refs/pr/1", "hf://org/name@refs%2Fpr%2F1"),
        ("hf://org/name@v1/sub", "v1", "hf://org/name@v1/sub"),
        ("models:/tiny/1", None, "models:/tiny/1"),
    ],
)
def test_revision_folds_into_the_uri(source: str, revision: str | None, expected: str) -> None:
    from dynaudit.sources import with_revision
    from dynaudit.sources.hub import parse

    pinned = with_revision(source, revision)
    assert pinned == expected
    if revision is not None:
        repo = parse(pinned)
        assert repo is not None and repo.revision == revision


@pytest.mark.parametrize(
    ("source", "says"),
    [
        ("hf://org/name@v1", "--revision 'v2' differs from the revision 'v1'"),
        ("models:/tiny/1", "MLflow URI names its version"),
        ("{local}", "a local path has no revision"),
    ],
)
def test_a_revision_that_cannot_apply_is_a_usage_error(
    source: str, says: str, tmp_path: Path
) -> None:
    from dynaudit.sources import with_revision

    with pytest.raises(dynaudit.DynauditError, match=re.escape(says)) as caught:
        with_revision(source.format(local=tmp_path), "v2")
    assert caught.value.exit_code == 2 and "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("card", "base"),
    [
        ("---\nlicense: mit\nbase_model: org/base\n---\n# x", "org/base"),
        ("---\nbase_model:\n- org/first\n- org/second\n---\n", "org/first"),
        ("# no front matter\nbase_model: x", None),
        ("---\nbase_model: org/base  # the model we tuned\n---\n", "org/base"),
        ('---\nbase_model: ["org/a", org/b]\n---\n', "org/a"),
        ("---\r\nbase_model: 'org/crlf'\r\n---\r\n", "org/crlf"),
        ("---\nmodel-index: not a list\nbase_model: org/m\n---\n", "org/m"),
        ("---\nlicense: mit\n---\n", None),
    ],
)
def test_the_model_card_is_read_by_huggingface_hub(
    card: str, base: str | None, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """Regression: the hand-written reader kept a trailing comment and a flow list's
    brackets as part of the name. Through find_baseline, as check uses it."""
    from dynaudit.baseline_store import find_baseline

    (tmp_path / "README.md").write_bytes(card.encode())
    if base is None:
        with pytest.raises(dynaudit.DynauditError, match="no baseline given"):
            find_baseline(tmp_path, None)
    else:
        assert find_baseline(tmp_path, None) == (base, "the model card's base_model")
    assert capfd.readouterr().err == ""  # huggingface_hub's warnings stay quiet


@pytest.mark.parametrize(
    ("front", "says"),
    [
        ("a: &x [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\nb: [*x, *x, *x, *x, *x]\n", "aliases"),
        ("a: " + "[" * 20_000 + "]" * 20_000 + "\n", "nested deeper than 64"),
        ("a: x\n" * 60_000, "over 256 KiB"),
        ("base_model: [unclosed\n", "cannot be read"),
        ("- a list\n- not a mapping\n", "should be a dict"),
        (  # huggingface_hub's model-index walk raised AttributeError: exit 4 (regression)
            "model-index: [{name: x, results: [{task: {type: t}, dataset: {type: a, name: b},"
            " metrics: [{type: m, value: 1}], source: [1]}]}]\n",
            "",
        ),
    ],
)
def test_a_hostile_model_card_is_one_line_exit_3(front: str, says: str) -> None:
    from dynaudit.sources.hub import card_base_model

    started = time.monotonic()
    with pytest.raises(dynaudit.DynauditError, match=says or None) as caught:
        card_base_model(f"---\n{front}---\n# card\n", "ckpt/README.md")
    assert time.monotonic() - started < 5
    message = str(caught.value)
    assert caught.value.exit_code == 3 and "\n" not in message
    assert message.startswith("ckpt/README.md: the model card's YAML front matter")


@pytest.mark.parametrize(
    "uri",
    ["hf://org/name@..", "hf://org/name@%2E%2E", "hf://org/name@..%2F..%2Fx",
     "hf://org/name@%2Fetc%2Fpasswd", "hf://org/name@a%5Cb", "hf://org/name@a%0Ab"],
)  # fmt: skip
def test_a_revision_cannot_leave_the_cache(uri: str) -> None:
    """Regression: a revision is joined to the cache folder (refs/<revision>, read offline and
    written online); ``..`` or an absolute one was accepted, and offline it was exit 4."""
    from dynaudit.errors import UsageError
    from dynaudit.sources import hub, with_revision

    with pytest.raises(UsageError, match="is not a revision"):
        hub.parse(uri)
    with pytest.raises(UsageError, match="is not a revision"):
        with_revision("hf://org/name", "../../x")


# -- MLflow -----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def registered(mlflow_server: MlflowServer, sharded_llama: Path) -> dict[str, str]:
    """The tiny LLaMA logged as run artifacts, registered as tiny-llama version 1 with alias
    champion, and as a logged model (MLflow 3's models:/m-<id>)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server.url, registry_uri=mlflow_server.url)
    experiment = client.create_experiment("dynaudit-sources")
    run = client.create_run(experiment)
    run_id = run.info.run_id
    client.log_artifacts(run_id, str(sharded_llama), "checkpoint")
    client.set_terminated(run_id)
    client.create_registered_model("tiny-llama")
    version = client.create_model_version(
        "tiny-llama", source=f"runs:/{run_id}/checkpoint", run_id=run_id
    )
    client.set_registered_model_alias("tiny-llama", "champion", version.version)
    logged = client.create_logged_model(experiment_id=experiment, name="tiny-llama")
    client.log_model_artifacts(logged.model_id, str(sharded_llama))
    client.finalize_logged_model(logged.model_id, "READY")
    return {"run_id": run_id, "model_id": logged.model_id, "version": str(version.version)}


@pytest.mark.parametrize("uri", ["models:/tiny-llama/1", "models:/tiny-llama@champion"])
def test_mlflow_measure_equals_local(
    mlflow_server: MlflowServer,
    registered: dict[str, str],
    local_numbers: dict[str, Any],
    tmp_path: Path,
    uri: str,
) -> None:
    out = tmp_path / "r.json"
    proc = run_cli("measure", uri, *FAST_FLAGS, "--json", str(out), "--quiet",
               env={"MLFLOW_TRACKING_URI": mlflow_server.url})  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "Downloading artifacts" not in proc.stderr  # no progress bars in CI logs
    report = Report.model_validate_json(out.read_text())
    assert figures(report) == local_numbers
    assert report.source.uri == uri and report.source.revision == "tiny-llama/1"


def test_every_mlflow_form_resolves_to_the_same_checkpoint(
    mlflow_server: MlflowServer, registered: dict[str, str], local_numbers: dict[str, Any]
) -> None:
    options = SourceOptions(mlflow_uri=mlflow_server.url)
    for uri in (
        "models:/tiny-llama/latest",
        f"models:/{registered['model_id']}",
        f"runs:/{registered['run_id']}/checkpoint",
    ):
        report = dynaudit.measure(uri, sources=options, cache=False, **FAST)
        assert figures(report) == local_numbers, uri


@pytest.mark.parametrize(
    ("uri", "needle"),
    [
        ("models:/no-such-model/1", "not found"),
        ("models:/tiny-llama/99", "not found"),
        ("models:/tiny-llama@no-such-alias", "not found"),
        ("runs:/0123456789abcdef/checkpoint", "not found"),
    ],
)
def test_mlflow_failures_are_one_line_exit_3(
    mlflow_server: MlflowServer, registered: dict[str, str], uri: str, needle: str
) -> None:
    started = time.monotonic()
    proc = run_cli("measure", uri, "--mlflow-uri", mlflow_server.url, *FAST_FLAGS)
    assert time.monotonic() - started < ERROR_SECONDS
    assert proc.returncode == 3, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and uri in lines[0] and needle in lines[0], proc.stderr


def test_a_dead_mlflow_server_fails_within_seconds() -> None:
    """With MLflow's own retry settings unset: dynaudit bounds them."""
    unset: dict[str, str | None] = {k: None for k in os.environ if k.startswith("MLFLOW_HTTP_")}
    started = time.monotonic()
    dead = f"http://127.0.0.1:{free_port()}"
    proc = run_cli("measure", "models:/tiny-llama/1", "--mlflow-uri", dead, env=unset)
    elapsed = time.monotonic() - started
    assert proc.returncode == 3, proc.stderr
    assert "cannot reach the MLflow server" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert elapsed < ERROR_SECONDS, elapsed


def test_credentials_in_a_server_url_are_not_printed() -> None:
    dead = free_port()
    proc = run_cli("measure", "models:/tiny-llama/1", "--mlflow-uri",
               f"http://user:s3cretpw@127.0.0.1:{dead}")  # fmt: skip
    assert proc.returncode == 3 and "s3cretpw" not in proc.stderr
    assert f"http://***@127.0.0.1:{dead}" in proc.stderr


def test_mlflow_uris_parse_like_mlflow() -> None:
    from dynaudit.sources.mlflow import parse

    assert parse("models:/m-0123abc").model_id == "m-0123abc"
    version = parse("models:/m-0123abc/1")  # version 1 of a registered model named m-0123abc
    assert (version.name, version.version, version.model_id) == ("m-0123abc", "1", None)
    nested = parse("models:/tiny@champion/model")
    assert (nested.name, nested.alias, nested.path) == ("tiny", "champion", "model")
    with pytest.raises(dynaudit.DynauditError, match="not an MLflow model URI"):
        parse("models:/")


def test_an_mlflow_uri_needs_a_tracking_server() -> None:
    proc = run_cli("measure", "models:/tiny-llama/1")
    assert proc.returncode == 2
    assert "MLFLOW_TRACKING_URI" in proc.stderr
