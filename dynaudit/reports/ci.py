"""What `check` tells a CI system: JUnit XML (one test case per group) and, inside GitHub
Actions, the job summary, the ``verdict`` output and ``::error::`` annotations.

Strings from checkpoints (tensor names, layer types, family notes) and baselines reach every
one of these formats, so each escapes them for its own syntax with the functions of
:mod:`dynaudit.reports.escape`: XML 1.0 (ElementTree then quotes ``& < > "``), workflow
commands (GitHub's percent-encoding: a name with a newline cannot start a second command),
Markdown. The job summary and ``$GITHUB_OUTPUT`` are side channels: failing to write them
costs a warning on stderr, never the verdict's exit code.

``python -m dynaudit.reports.ci`` runs the steps of the composite action
(``.github/actions/dynaudit-check``) that are more than a command line: splitting its
``extra-args``, its outputs, summary and pull-request comment body once ``check`` has exited,
and posting that comment. They are here, not in the action's YAML, so that tests run them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import sys
import urllib.error
import urllib.request
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

from dynaudit.errors import ExitCode, printable
from dynaudit.reports.check import render_check_markdown
from dynaudit.reports.escape import escape_command_data, escape_command_property, escape_xml
from dynaudit.schema import CheckReport, GroupComparison, scope_label

__all__ = [
    "COMMENT_MARKER",
    "comment_marker",
    "escape_command_data",
    "finish_action",
    "github_annotations",
    "post_pr_comment",
    "render_junit",
    "render_pr_comment",
    "report_to_github",
    "results_cache_key",
    "verdict_of",
]

# The first line of the action's pull-request comment: how a re-run finds the comment to update.
COMMENT_MARKER = "<!-- dynaudit-check -->"  # with a key per checked model: see comment_marker
COMMENT_LIMIT = 65536  # GitHub refuses a longer comment body (characters)
_KINDS = {"capacity_loss": "capacity loss", "damage": "damage", "non_finite": "non-finite weights"}


def _group_cases(report: CheckReport) -> list[tuple[str, GroupComparison, list[str]]]:
    """(test case name, its figures, messages of the findings that fail it): all layers, each
    depth third, each layer type. Names and messages are raw: each format escapes them. The
    figures travel with the case: looked up again by name, a layer type named ``top`` got the
    top third's. (A finding names what it concerns by name alone, thirds and types alike.)"""
    findings = report.verdict.findings
    return [
        (scope_label(kind, name), figures, [f.message for f in findings if name in f.groups])
        for kind, name, figures in report.comparison.scopes()
    ]


def render_junit(report: CheckReport) -> str:
    """JUnit XML: a test suite for the check, one test case per group."""
    cases = _group_cases(report)
    suite = ET.Element(
        "testsuite",
        name=escape_xml(f"dynaudit check {report.source.uri}"),
        tests=str(len(cases)),
        failures=str(sum(1 for _, _, reasons in cases if reasons)),
        time=f"{report.seconds:.3f}",
    )
    for label, group, reasons in cases:
        case = ET.SubElement(suite, "testcase", classname="dynaudit.check", name=escape_xml(label))
        if group.change is not None:
            ET.SubElement(case, "system-out").text = escape_xml(
                f"change {group.change.mean * 100:+.3f}% ± {group.change.std * 100:.3f}% "
                f"over {group.layers} layers, noise {(group.noise or 0) * 100:.3f}%"
            )
        if reasons:
            escaped = [escape_xml(reason) for reason in reasons]  # one line each
            failure = ET.SubElement(case, "failure", message=escaped[0], type="dynaudit.gate")
            failure.text = "\n".join(escaped)
    ET.indent(suite)
    return (
        '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(suite, encoding="unicode") + "\n"
    )


def github_annotations(report: CheckReport) -> list[str]:
    """One ``::error::`` line per finding: a finding is one root cause (a damaged layer, a
    depth third's capacity loss, the non-finite weights). Annotating failing groups, as JUnit
    does, repeated a damaged layer's finding under all layers, its third and its type."""
    return [
        f"::error title={escape_command_property(f'dynaudit: {_KINDS[finding.kind]}')}"
        f"::{escape_command_data(finding.message)}"
        for finding in report.verdict.findings
    ]


def _warn(message: str) -> None:
    from dynaudit.secrets import scrub

    print(f"dynaudit: warning: {scrub(printable(message))}", file=sys.stderr, flush=True)


def _append(variable: str, path: str, text: str, warn: Callable[[str], None]) -> None:
    """Append ``text`` to the file a GitHub variable names; an error is a warning."""
    try:
        with Path(path).open("a", encoding="utf-8") as fh:
            fh.write(text)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        warn(f"could not write ${variable} ({path}): {reason}; the verdict stands")


def report_to_github(
    report: CheckReport,
    env: Mapping[str, str] | None = None,
    *,
    warn: Callable[[str], None] = _warn,
) -> list[str]:
    """Inside GitHub Actions: append the Markdown report to ``$GITHUB_STEP_SUMMARY``, write
    ``verdict=pass|fail`` to ``$GITHUB_OUTPUT``; return the annotation lines to print.

    Either file being unwritable (a missing directory, a read-only or full disk) is one
    ``dynaudit: warning:`` line on stderr through ``warn``: the gate's verdict, and so the
    exit code, are the check's, not the side channel's."""
    env = os.environ if env is None else env
    if env.get("GITHUB_ACTIONS", "").lower() != "true":
        return []
    if summary := env.get("GITHUB_STEP_SUMMARY"):
        _append("GITHUB_STEP_SUMMARY", summary, render_check_markdown(report) + "\n", warn)
    if output := env.get("GITHUB_OUTPUT"):
        _append("GITHUB_OUTPUT", output, f"verdict={report.verdict.verdict}\n", warn)
    return github_annotations(report)


# -- the composite action's steps ------------------------------------------------------------


def verdict_of(exit_code: int) -> Literal["pass", "fail", "error"]:
    """The action's ``verdict`` output from ``check``'s exit code: 1 is the gate's failure,
    anything but 0 and 1 means there is no verdict (usage, input or internal error)."""
    if exit_code == ExitCode.OK:
        return "pass"
    return "fail" if exit_code == ExitCode.GATE_FAILED else "error"


def _exit_meaning(exit_code: int) -> str:
    try:
        return ExitCode(exit_code).meaning
    except ValueError:  # not dynaudit's: a killed job (137), a missing command (127)
        return "unexpected exit code"


def _run_url(env: Mapping[str, str]) -> str | None:
    parts = [env.get(name) for name in ("GITHUB_SERVER_URL", "GITHUB_REPOSITORY", "GITHUB_RUN_ID")]
    return None if not all(parts) else "{}/{}/actions/runs/{}".format(*parts)


def comment_marker(key: str = "") -> str:
    """The first line of the comment: one comment per checked model (``key``), so two uses of
    the action on one pull request (a matrix over models) do not overwrite each other."""
    if not key:
        return COMMENT_MARKER
    return f"<!-- dynaudit-check {hashlib.sha256(key.encode()).hexdigest()[:12]} -->"


def render_pr_comment(
    markdown: str | None, exit_code: int, run_url: str | None, key: str = ""
) -> str:
    """The pull-request comment: the marker line, then the Markdown report, or what went wrong
    when ``check`` wrote none (a comment left from a passing run must not outlive a broken
    one). Cut at a line to GitHub's size limit, saying so: the full report is in the run."""
    where = f"[the workflow run]({run_url})" if run_url else "the workflow run"
    if markdown is None:
        text = (
            f"# dynaudit check: {verdict_of(exit_code)}\n\n`dynaudit check` exited {exit_code} "
            f"({_exit_meaning(exit_code)}) without a report: see the log of {where}.\n"
        )
    else:
        text = markdown if markdown.endswith("\n") else markdown + "\n"
    body = f"{comment_marker(key)}\n{text}"
    if len(body) <= COMMENT_LIMIT:
        return body
    note = f"\n*The report is cut here: the whole report is in the job summary of {where}.*\n"
    cut = body[: COMMENT_LIMIT - len(note)]
    return cut[: cut.rfind("\n") + 1] + note


def results_cache_key(report_json: Path, prefix: str) -> str:
    """The key under which the action saves dynaudit's result cache after checking the model
    of ``report_json``: ``prefix`` (the model) and its revision as resolved by the check — a
    Hub commit or a registry version, else a digest of the weight files. A new revision gets
    a new key, so the cache is saved again (a key, once saved, is never updated)."""
    source = json.loads(report_json.read_text(encoding="utf-8"))["source"]
    if revision := source.get("revision"):
        return prefix + "".join(c if c.isalnum() or c in "._-" else "_" for c in revision)[:64]
    files = json.dumps(source.get("files", {}), sort_keys=True).encode()
    return prefix + "sha256-" + hashlib.sha256(files).hexdigest()[:16]


def finish_action(
    exit_code: int,
    reports: Mapping[str, Path],
    comment_body: Path,
    cache_prefix: str,
    env: Mapping[str, str] | None = None,
    *,
    warn: Callable[[str], None] = _warn,
) -> None:
    """After ``check`` exited: write the action's outputs (``verdict``, ``exit-code``, the
    path of each report written, ``cache-key``, ``comment-body``) and the comment body file.
    With no verdict (exit 2, 3, 4), also one annotation and a job-summary line, which
    ``check`` wrote only with a report."""
    env = os.environ if env is None else env
    written = {name: path.resolve() for name, path in reports.items() if path.is_file()}
    outputs = {"verdict": verdict_of(exit_code), "exit-code": str(exit_code)}
    outputs |= {name: str(path) for name, path in written.items()}
    if "json" in written and cache_prefix:
        outputs["cache-key"] = results_cache_key(written["json"], cache_prefix)
    markdown = written["markdown"].read_text(encoding="utf-8") if "markdown" in written else None
    try:
        body = render_pr_comment(markdown, exit_code, _run_url(env), env.get("INPUT_MODEL", ""))
        comment_body.write_text(body, "utf-8")
        outputs["comment-body"] = str(comment_body.resolve())
    except OSError as exc:
        warn(f"could not write the comment body ({comment_body}): {exc.strerror}")
    if outputs["verdict"] == "error":
        line = f"dynaudit check exited {exit_code} ({_exit_meaning(exit_code)}); see the log"
        print(f"::error title=dynaudit check::{escape_command_data(line)}", flush=True)
        if summary := env.get("GITHUB_STEP_SUMMARY"):
            _append("GITHUB_STEP_SUMMARY", summary, f"# dynaudit check: error\n\n{line}\n", warn)
    if output := env.get("GITHUB_OUTPUT"):
        text = "".join(f"{name}={value}\n" for name, value in outputs.items())
        _append("GITHUB_OUTPUT", output, text, warn)


def _github(method: str, url: str, token: str, body: Mapping[str, str] | None = None) -> Any:
    """One GitHub REST call; its JSON answer. Errors are urllib's."""
    request = urllib.request.Request(
        url,
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={
            "Accept": "application/vnd.github+json",
            "Authorization": f"Bearer {token}",
            "Content-Type": "application/json",
            "X-GitHub-Api-Version": "2022-11-28",
        },
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read() or b"null")


def _find_comment(issue: str, token: str, marker: str) -> int | None:
    """The id of the pull request's comment that a bot (the workflow's token) left starting
    with ``marker``, looking through every page of its comments (100 a page). A person's
    comment that starts with the marker is not ours to edit."""
    for page in range(1, 1000):
        comments = _github("GET", f"{issue}/comments?per_page=100&page={page}", token)
        for comment in comments:
            by_bot = (comment.get("user") or {}).get("type") == "Bot"
            if by_bot and str(comment.get("body", "")).split("\n", 1)[0] == marker:
                return int(comment["id"])
        if len(comments) < 100:
            break
    return None


def post_pr_comment(
    body: str, env: Mapping[str, str] | None = None, *, warn: Callable[[str], None] = _warn
) -> Literal["created", "updated"] | None:
    """Put ``body`` on the pull request ``DYNAUDIT_PR_NUMBER`` of ``GITHUB_REPOSITORY``: edit the
    comment a previous run left (found by its marker), else add one. Outside a pull request,
    nothing. A side channel: a failure (no ``pull-requests: write`` permission, a fork's
    read-only token, the API down) is one warning, and the token appears in no message."""
    env = os.environ if env is None else env
    number, repo, token = (
        env.get(name, "") for name in ("DYNAUDIT_PR_NUMBER", "GITHUB_REPOSITORY", "GITHUB_TOKEN")
    )
    if not number:
        print("dynaudit: not a pull request: no comment", file=sys.stderr, flush=True)
        return None
    if not (repo and token):
        warn("no comment: GITHUB_REPOSITORY and the token (input github-token) are needed")
        return None
    api = env.get("GITHUB_API_URL", "https://api.github.com").rstrip("/")
    issue = f"{api}/repos/{repo}/issues/{number}"
    try:
        marker = body.split("\n", 1)[0]
        if (found := _find_comment(issue, token, marker)) is not None:
            _github("PATCH", f"{api}/repos/{repo}/issues/comments/{found}", token, {"body": body})
            return "updated"
        _github("POST", f"{issue}/comments", token, {"body": body})
        return "created"
    except Exception as exc:  # whatever the API did, the verdict stands
        from dynaudit.secrets import scrub

        refused = isinstance(exc, urllib.error.HTTPError) and exc.code in (401, 403, 404)
        reason = f"HTTP {exc.code}" if isinstance(exc, urllib.error.HTTPError) else str(exc)
        hint = " (the job needs `pull-requests: write`; a fork's token is read-only)"
        message = f"could not comment on pull request #{number}: {reason}"
        warn(scrub(message, [token]) + (hint if refused else "") + "; the verdict stands")
        return None


def _split_args(text: str) -> int:
    """Print the action's ``extra-args`` as shell words (quotes as in a shell, nothing
    expanded), each ended by NUL for ``mapfile -d ''``; unbalanced quotes are exit 2."""
    try:
        words = shlex.split(text)
    except ValueError as exc:
        print(f"dynaudit: error: extra-args: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    sys.stdout.write("".join(word + "\0" for word in words))
    return ExitCode.OK


def main(argv: list[str] | None = None) -> int:
    """``python -m dynaudit.reports.ci split-args|finish|comment``: the action's steps."""
    parser = argparse.ArgumentParser(prog="python -m dynaudit.reports.ci")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("split-args").add_argument("text")
    finish = commands.add_parser("finish")
    finish.add_argument("--exit-code", type=int, required=True)
    for name in ("json", "markdown", "junit", "comment-body"):
        finish.add_argument(f"--{name}", type=Path, required=True)
    finish.add_argument("--cache-prefix", default="")
    commands.add_parser("comment").add_argument("body", type=Path)
    args = parser.parse_args(argv)
    if args.command == "split-args":
        return _split_args(args.text)
    if args.command == "finish":
        reports = {"json": args.json, "markdown": args.markdown, "junit": args.junit}
        finish_action(args.exit_code, reports, args.comment_body, args.cache_prefix)
        return ExitCode.OK
    post_pr_comment(args.body.read_text(encoding="utf-8"))
    return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
