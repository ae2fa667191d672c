"""`check hf://… --hub-comment` and `--hub-pr` (issue 23): the verdict written back to the Hub
repository that was checked, through the real ``huggingface_hub`` client against the local
endpoint of tests/hubserver.py, which keeps the discussions, comments and pull-request commits
it is sent. Checkpoints: a generic chain whose tensor names are the crafted ones of
tests/test_escaping.py, its gentle fine-tune (a low-rank update of two layers: passes) and a
damaged copy (two layers zeroed: fails)."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from huggingface_hub import HfApi, RepoCard
from safetensors.torch import save_file

import dynaudit
from dynaudit import hub_comments
from dynaudit.errors import printable
from dynaudit.hub_comments import MARKER, card_block, discussion_title, pr_title, render_comment
from dynaudit.reports.escape import escape_markdown
from dynaudit.schema import CheckReport
from dynaudit.sources.hub import parse
from tests.cli import CliResult, run_cli
from tests.hubserver import Discussion, LocalHub
from tests.test_escaping import CRAFTED, FORBIDDEN, assert_clean, assert_tables_keep_columns

TOKEN = "hf_dynaudit_bot_write_0123456789abcdef"
OTHER = "hf_alice_write_fedcba9876543210"  # a person with access to the same repositories
BOT, ALICE = "dynaudit-bot", "alice"
FAST: dict[str, Any] = {"q_dim": 16, "pieces": 4, "steps": 30}
CARD = "---\nlicense: apache-2.0\nbase_model: org/hc-base\n---\n# A fine-tune\n\nIts own text.\n"


def _write(folder: Path, kind: str) -> Path:
    """The chain of :data:`CRAFTED` Linear weights: ``base``, ``good`` (two layers moved by a
    rank-2 update, 3 % of their norm) or ``damaged`` (two layers zeroed); with a model card."""
    gen = torch.Generator().manual_seed(0)
    dims = [16 if i % 2 == 0 else 24 for i in range(len(CRAFTED) + 1)]
    tensors = {
        name: torch.randn(dims[i + 1], dims[i], generator=gen) * 0.1
        for i, name in enumerate(CRAFTED)
    }
    if kind == "good":
        update = torch.Generator().manual_seed(1)
        for name in CRAFTED[2:4]:
            w = tensors[name]
            delta = torch.randn(w.shape[0], 2, generator=update) @ torch.randn(
                2, w.shape[1], generator=update
            )
            tensors[name] = w + 0.03 * w.norm() / delta.norm() * delta
    if kind == "damaged":
        for name in (CRAFTED[0], CRAFTED[3]):
            tensors[name] = torch.zeros_like(tensors[name])
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "README.md").write_text(CARD)
    return folder


@pytest.fixture(scope="module")
def models(hub: LocalHub, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    """The three checkpoints, the base's stored baseline, and the writers of the local Hub."""
    root = tmp_path_factory.mktemp("hub-comments")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("DYNAUDIT_CACHE_DIR", str(root / "cache"))
        found = {kind: _write(root / kind, kind) for kind in ("base", "good", "damaged")}
        dynaudit.baseline(found["base"], root / "baseline", seeds=2, **FAST)
    hub.add_user(BOT, TOKEN)
    hub.add_user(ALICE, OTHER)
    yield found | {"baseline": root / "baseline"}


def _check(
    hub: LocalHub,
    models: dict[str, Path],
    repo_id: str,
    *flags: str,
    out: Path | None = None,
) -> CliResult:
    """``dynaudit check hf://REPO_ID`` against the stored baseline, the bot's token in HF_TOKEN."""
    report = ["--json", str(out)] if out is not None else []
    return run_cli(
        "check", f"hf://{repo_id}", "--baseline", models["baseline"], "--hf-endpoint", hub.url,
        "-q", *report, *flags, env={"HF_TOKEN": TOKEN},
    )  # fmt: skip


def _ours(hub: LocalHub, repo_id: str, pull_request: bool = False) -> list[Discussion]:
    return [
        d for d in hub.discussions(repo_id) if d.author == BOT and d.is_pull_request == pull_request
    ]


def _no_secret(*texts: str) -> None:
    for text in texts:
        assert TOKEN not in text and OTHER not in text


# -- --hub-comment ---------------------------------------------------------------------------


def test_each_check_updates_the_one_discussion_in_place(
    hub: LocalHub, models: dict[str, Path], tmp_path: Path
) -> None:
    """A good fine-tune, then a damaged one pushed over it: one discussion, its one dynaudit
    comment edited from pass to fail; a person's discussion of the same title and a person's
    comment in ours are left as they are."""
    repo_id = "org/hc-updated"
    first = hub.add(repo_id, models["good"])
    HfApi(endpoint=hub.url, token=OTHER).create_discussion(
        repo_id, discussion_title(parse(f"hf://{repo_id}")), description="my own notes"
    )
    proc = _check(hub, models, repo_id, "--hub-comment")
    assert proc.returncode == 0, proc.stderr
    (ours,) = _ours(hub, repo_id)
    (comment,) = ours.comments
    assert comment.content.startswith(MARKER + "\n# dynaudit check: hf://org/hc-updated — ✅ pass")
    assert f"commit `{first}`" in comment.content
    assert proc.stderr == f"dynaudit: Hub discussion opened: {hub.url}/{repo_id}/discussions/2\n"
    HfApi(endpoint=hub.url, token=OTHER).comment_discussion(repo_id, ours.num, "looks fine?")

    second = hub.add(repo_id, models["damaged"])
    out = tmp_path / "check.json"
    proc = _check(hub, models, repo_id, "--hub-comment", out=out)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr == f"dynaudit: Hub discussion updated: {hub.url}/{repo_id}/discussions/2\n"
    assert _ours(hub, repo_id) == [ours] and len(hub.discussions(repo_id)) == 2
    theirs = hub.discussions(repo_id)[0]
    assert theirs.author == ALICE and [c.content for c in theirs.comments] == ["my own notes"]
    comment, reply = ours.comments
    assert comment.edits == 1 and reply.author == ALICE and reply.content == "looks fine?"
    assert "❌ fail" in comment.content and f"commit `{second}`" in comment.content
    assert first not in comment.content
    report = CheckReport.model_validate_json(out.read_text())
    assert report.verdict.failing_groups
    for reason in report.verdict.reasons:  # the findings, escaped as in --markdown
        assert f"- {escape_markdown(reason)}" in comment.content
    _no_secret(proc.stdout, proc.stderr, comment.content)


def test_the_posted_report_is_safe_markdown(hub: LocalHub, models: dict[str, Path]) -> None:
    """The damaged checkpoint's crafted tensor names (ANSI, BEL, BiDi, line breaks, workflow
    commands, Markdown and HTML) reach the comment inert: no control or invisible character,
    no raw HTML, tables that keep their columns."""
    repo_id = "org/hc-crafted"
    hub.add(repo_id, models["damaged"])
    proc = _check(hub, models, repo_id, "--hub-comment")
    assert proc.returncode == 1, proc.stderr
    ((comment,),) = [d.comments for d in _ours(hub, repo_id)]
    text = comment.content
    assert_clean(text, "the Hub comment")
    assert assert_tables_keep_columns(text, "the Hub comment") >= len(CRAFTED)
    assert "<b>" not in text and "](http" not in text
    assert text.count("<!--") == 1  # the marker, ours
    assert escape_markdown(CRAFTED[3]) in text  # the name is there, shown


def test_a_long_report_is_cut_at_a_line(
    hub: LocalHub, models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    report = dynaudit.check(models["damaged"], models["baseline"], cache=False)
    monkeypatch.setattr(hub_comments, "COMMENT_LIMIT", 1500)
    body = render_comment(report)
    assert len(body) <= 1500 and body.startswith(MARKER + "\n")
    assert "*The report is cut here" in body and body.rstrip().endswith("in place.*")
    assert_tables_keep_columns(body, "cut comment")


# -- --hub-pr --------------------------------------------------------------------------------


def test_hub_pr_opens_one_pull_request_with_the_card_block(
    hub: LocalHub, models: dict[str, Path]
) -> None:
    """The pull request's README.md is main's card with a ``dynaudit:`` block; a later check of
    a new push commits the new block to the same pull request and edits its description; a
    re-check of the same commit changes nothing."""
    repo_id = "org/hc-card"
    first = hub.add(repo_id, models["good"])
    proc = _check(hub, models, repo_id, "--hub-pr")
    assert proc.returncode == 0, proc.stderr
    url = f"{hub.url}/{repo_id}/discussions/1"
    assert proc.stderr == f"dynaudit: Hub pull request opened: {url}\n"
    (pull,) = _ours(hub, repo_id, pull_request=True)
    assert pull.title == pr_title(parse(f"hf://{repo_id}")) and pull.status == "open"
    assert pull.comments[0].content.startswith(MARKER) and "✅ pass" in pull.comments[0].content
    assert hub.file(repo_id, "main", "README.md") == CARD  # main is untouched
    card = RepoCard(hub.file(repo_id, "refs/pr/1", "README.md") or "")
    assert card.data["license"] == "apache-2.0" and card.data["base_model"] == "org/hc-base"
    assert card.text.strip() == "# A fine-tune\n\nIts own text."
    block = card.data["dynaudit"]
    assert block["verdict"] == "pass" and block["revision"] == first
    assert block["source"] == f"hf://{repo_id}" and block["baseline"] == str(models["baseline"])
    assert block["dynaudit_version"] == dynaudit.__version__ and block["failing_groups"] == []

    second = hub.add(repo_id, models["damaged"])
    proc = _check(hub, models, repo_id, "--hub-pr")
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr == f"dynaudit: Hub pull request updated: {url}\n"
    assert _ours(hub, repo_id, pull_request=True) == [pull] and len(pull.commits) == 2
    block = RepoCard(hub.file(repo_id, "refs/pr/1", "README.md") or "").data["dynaudit"]
    assert block["verdict"] == "fail" and block["revision"] == second
    assert block["failing_groups"] and all(not FORBIDDEN.search(g) for g in block["failing_groups"])
    assert "❌ fail" in pull.comments[0].content and pull.comments[0].edits == 1

    proc = _check(hub, models, repo_id, "--hub-pr")
    assert proc.returncode == 1 and proc.stderr.endswith(f"pull request unchanged: {url}\n")
    assert len(pull.commits) == 2
    _no_secret(proc.stdout, proc.stderr, *(c.content for c in pull.comments))


def test_the_card_block_of_a_report() -> None:
    """Strings from the checkpoint are one printable line each in the block."""
    report = CheckReport.model_validate_json(
        (Path(__file__).parent / "golden" / "check.json").read_text()
    )
    block = card_block(report)
    assert block["verdict"] == report.verdict.verdict == "fail"
    assert block["summary"] == [printable(reason) for reason in report.verdict.reasons]
    assert "\\x1b[2K" in block["summary"][2]  # the crafted name, shown
    strings = [v for v in block.values() if isinstance(v, str)]
    strings += [s for v in block.values() if isinstance(v, list) for s in v]
    assert strings and not any(FORBIDDEN.search(s) or "\n" in s for s in strings)
    assert set(block) >= {"verdict", "source", "revision", "baseline", "dynaudit_version"}
    assert json.loads(json.dumps(block)) == block  # plain data, as YAML dumps it


# -- failures: the verdict stands --------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "flag", "route", "code"),
    [
        ("good", "--hub-comment", r"/discussions", 0),
        ("damaged", "--hub-comment", r"/discussions", 1),
        ("damaged", "--hub-pr", r"/commit/", 1),
    ],
)
def test_a_failing_hub_is_one_warning_and_the_verdict_stands(
    hub: LocalHub,
    models: dict[str, Path],
    tmp_path: Path,
    kind: str,
    flag: str,
    route: str,
    code: int,
) -> None:
    repo_id = f"org/hc-fault-{kind}{flag.replace('--', '-')}"
    hub.add(repo_id, models[kind])
    out = tmp_path / "check.json"
    with hub.fail(route, 500):
        proc = _check(hub, models, repo_id, flag, out=out)
    assert proc.returncode == code, proc.stderr
    assert json.loads(out.read_text())["verdict"]["verdict"] == ("pass" if code == 0 else "fail")
    (line,) = proc.stderr.splitlines()
    assert line.startswith(
        f"dynaudit: warning: could not {'post' if 'comment' in flag else 'open'}"
    )
    assert f"{repo_id} ({hub.url} answered HTTP 500" in line and "the verdict stands" in line
    assert not hub.discussions(repo_id)


def test_a_stalled_hub_is_given_up_and_the_verdict_stands(
    hub: LocalHub, models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """huggingface_hub 2 has no timeout of its own: a Hub that never answers would hold the
    exit code back for ever. Each post is given up after its deadline."""
    repo_id = "org/hc-stalled"
    hub.add(repo_id, models["damaged"])
    monkeypatch.setattr(hub_comments, "DEADLINE", 0.5)
    with hub.fail(r"/whoami", 500, delay=10.0):
        started = time.monotonic()
        proc = _check(hub, models, repo_id, "--hub-comment")
        assert time.monotonic() - started < 10.0
    assert proc.returncode == 1, proc.stderr
    (line,) = proc.stderr.splitlines()
    assert "(no answer from the Hub within 0.5 s); the verdict stands" in line


def test_a_refused_token_is_one_warning_and_never_shown(
    hub: LocalHub, models: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    """A token the Hub does not know, given as a flag, with -vv (debug logs): one warning
    saying what to fix, exit 1 from the verdict, and the token in no output or log record."""
    repo_id = "org/hc-refused"
    hub.add(repo_id, models["damaged"])
    wrong = "hf_not_a_known_token_5555555555"
    caplog.set_level(logging.DEBUG)
    proc = run_cli(
        "-vv", "check", f"hf://{repo_id}", "--baseline", models["baseline"], "--hf-endpoint",
        hub.url, "--hf-token", wrong, "--hub-comment", "--hub-pr", "-q", env={"HF_TOKEN": None},
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if "dynaudit: warning:" in line]
    assert len(warnings) == 2 and all("refused the token (HTTP 401" in w for w in warnings)
    for text in (proc.stdout, proc.stderr, caplog.text):
        assert wrong not in text
    assert not any(wrong in request.path for request in hub.requests)
    assert not hub.discussions(repo_id)


# -- usage -----------------------------------------------------------------------------------


@pytest.mark.parametrize("flag", ["--hub-comment", "--hub-pr"])
@pytest.mark.parametrize("source", ["local", "org/bare-name", "models:/model/1"])
def test_only_hf_sources_take_the_hub_flags(
    models: dict[str, Path], source: str, flag: str
) -> None:
    """Exit 2 in one line, before anything is read or fitted (the local path exists)."""
    given = str(models["good"]) if source == "local" else source
    proc = run_cli("check", given, "--baseline", models["baseline"], flag)
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.splitlines()
    assert line.startswith(f"dynaudit: error: {flag} posts to the Hub") and "hf://org/name" in line
    assert proc.stdout == ""
