"""A check's verdict written back to the Hub repository it audited: a discussion holding the
Markdown report (``check hf://… --hub-comment``), or a pull request adding a ``dynaudit:``
block to the model card (``--hub-pr``). Everything goes through ``huggingface_hub``'s own
``HfApi`` (discussions, ``create_commit``) and ``RepoCard`` (the card's metadata), pointed at
the endpoint and token the check read the checkpoint with.

One of each per repository (and checkpoint folder), found again on later checks and updated
in place, so repeated checks never pile up duplicates:

- **the discussion** is the open one titled :func:`discussion_title` that the token's own
  user opened; its comment by that user starting with :data:`MARKER` is edited to the new
  report (a comment is added when a person removed the marker). None open: a new one.
- **the pull request** is the open one titled :func:`pr_title` by that user; a later check
  commits the updated card to its ``refs/pr/N`` and edits its description to the new report.
  None open: ``create_commit(create_pr=True)`` opens one from ``main``, as
  ``huggingface_hub.metadata_update(create_pr=True)`` does (``metadata_update`` itself takes no
  endpoint: it would read and write the default Hub, whatever ``--hf-endpoint`` says).

Tensor and layer names come from the checkpoint: the report is the Markdown renderer's,
escaped (:mod:`dynaudit.reports.escape`), and the card block's strings are made printable
before YAML quotes them. Both are side channels (SPEC §8): :func:`post_or_warn` runs after
every report file is written, and any failure is one warning line, the verdict's exit code
standing. The token is the client's (``--hf-token``, else ``HF_TOKEN`` or the stored login)
and appears in no message.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from dynaudit.errors import DynauditError, UsageError, printable
from dynaudit.schema import CheckReport
from dynaudit.sources.base import SourceOptions, redact_url
from dynaudit.sources.hub import SCHEME, HubRepo, check_card_yaml, parse

if TYPE_CHECKING:
    from huggingface_hub import HfApi
    from huggingface_hub.community import Discussion

__all__ = [
    "CARD_KEY",
    "MARKER",
    "Posted",
    "card_block",
    "discussion_title",
    "open_card_pr",
    "post_comment",
    "post_error",
    "post_or_warn",
    "pr_title",
    "render_comment",
    "render_error",
    "require_hub_source",
]

T = TypeVar("T")

MARKER = "<!-- dynaudit-check -->"  # the first line of the comment dynaudit keeps updated
CARD_KEY = "dynaudit"  # the model card's metadata key --hub-pr writes
COMMENT_LIMIT = 65536  # characters; GitHub's limit, kept as a bound for the Hub's comments
DEADLINE = 120.0  # seconds each of --hub-comment and --hub-pr may take, all requests together
_TITLE_LIMIT = 200  # the Hub's limit for a discussion title
_MAX_REASONS = 10  # of the verdict's reasons, in the card block
_MAX_REASON = 300  # characters of each
_CARD = "README.md"
_BASE = "main"  # the branch a pull request targets


@dataclass(frozen=True)
class Posted:
    """Where the report went: a discussion or pull request, what was done, its address."""

    where: Literal["discussion", "pull request"]
    action: Literal["opened", "updated", "commented", "unchanged"]
    url: str


def require_hub_source(source: str, flag: str) -> HubRepo:
    """SOURCE as a Hub repository, for ``flag``: only ``hf://`` SOURCEs can take it (a bare
    ``org/name`` may be a local folder, which has no discussions); else a usage error."""
    repo = parse(source) if source.startswith(SCHEME) else None
    if repo is None:
        raise UsageError(
            f"{flag} posts to the Hub repository that was checked; SOURCE {source!r} is not "
            "one: write it hf://org/name[@revision]",
            uri=source,
        )
    return repo


def discussion_title(repo: HubRepo) -> str:
    """The title that finds the discussion again: one per repository and checkpoint folder."""
    return _title("dynaudit check report", repo)


def pr_title(repo: HubRepo) -> str:
    """The title that finds the model-card pull request again."""
    return _title("dynaudit: the check verdict in the model card", repo)


def _title(text: str, repo: HubRepo) -> str:
    folder = f" ({printable(repo.subfolder)})" if repo.subfolder else ""
    return (text + folder)[:_TITLE_LIMIT]


def render_comment(report: CheckReport, flag: str = "--hub-comment") -> str:
    """:data:`MARKER`, the Markdown report, and a line saying which commit was checked and that
    the comment is kept up to date; cut at a line to :data:`COMMENT_LIMIT`, saying so."""
    from dynaudit.reports.check import render_check_markdown
    from dynaudit.reports.escape import markdown_code

    checked = report.source.revision
    commit = f"commit {markdown_code(checked)}" if checked else "the revision named above"
    footer = (
        f"\n---\n*Checked {commit} with dynaudit {markdown_code(_version(report))}. "
        f"Each `dynaudit check {flag}` of this repository updates this report in place.*\n"
    )
    body = f"{MARKER}\n{render_check_markdown(report)}"
    if len(body) + len(footer) <= COMMENT_LIMIT:
        return body + footer
    note = "\n*The report is cut here: `dynaudit check --markdown PATH` writes all of it.*\n"
    cut = body[: COMMENT_LIMIT - len(note) - len(footer)]
    return cut[: cut.rfind("\n") + 1] + note + footer


def card_block(report: CheckReport) -> dict[str, Any]:
    """The ``dynaudit:`` metadata of the model card: the verdict, what was checked against
    what, a summary, and the versions that made it. Strings from the checkpoint are printable
    (one line, no control character); YAML quotes what it must."""
    verdict = report.verdict
    change = report.comparison.all.change
    reasons = [printable(reason)[:_MAX_REASON] for reason in verdict.reasons[:_MAX_REASONS]]
    if len(verdict.reasons) > _MAX_REASONS:
        reasons.append(f"and {len(verdict.reasons) - _MAX_REASONS} more")
    return {
        "verdict": verdict.verdict,
        "source": printable(report.source.uri),
        "revision": report.source.revision,
        "baseline": printable(report.baseline.ref),
        "failing_groups": [printable(group) for group in verdict.failing_groups],
        "failing_layers": len(verdict.failing_layers),
        "layers": report.comparison.all.layers,
        "change_all_percent": None if change is None else round(change.mean * 100, 3),
        "summary": reasons,
        "dynaudit_version": _version(report),
        "protocol_version": report.protocol_version,
    }


def _version(report: CheckReport) -> str:
    from dynaudit._version import __version__

    return report.tool.get("version", __version__)


# -- posting ------------------------------------------------------------------------------


def post_or_warn(
    report: CheckReport, options: SourceOptions, *, comment: bool = False, pr: bool = False
) -> list[Posted]:
    """:func:`post_comment` and/or :func:`open_card_pr` as side channels: each success is one
    line on stderr naming the address, each failure one warning line; nothing is raised, so
    the verdict's exit code stands."""
    posted = []
    steps = [(comment, post_comment, "post the report to a discussion of"),
             (pr, open_card_pr, "open the model-card pull request on")]  # fmt: skip
    for wanted, step, what in steps:
        if not wanted:
            continue
        try:
            done = _within(DEADLINE, step, report, options)
        except Exception as exc:  # whatever broke, the reports are written and the verdict stands
            repo = _repo_id(report)
            logging.getLogger("dynaudit").warning(
                "could not %s %s (%s); the verdict stands", what, repo, _reason(exc, options)
            )
            continue
        posted.append(done)
        _say(f"dynaudit: Hub {done.where} {done.action}: {done.url}")
    return posted


class _Stalled(Exception):
    """The Hub did not answer in time (``huggingface_hub`` 2 waits for ever by default)."""


def _within(seconds: float, step: Callable[..., T], *args: Any) -> T:
    """``step(*args)`` in a daemon thread, given up after ``seconds``: a Hub that accepts the
    connection and never answers must not hold the verdict's exit code back. The abandoned
    thread ends with the process."""
    import threading

    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append(step(*args))
        except BaseException as exc:  # handed to the caller
            outcome.append(exc)

    worker = threading.Thread(target=run, name="dynaudit-hub-post", daemon=True)
    worker.start()
    worker.join(seconds)
    if not outcome:
        raise _Stalled(f"no answer from the Hub within {seconds:g} s")
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    return outcome[0]  # type: ignore[no-any-return]


def post_comment(report: CheckReport, options: SourceOptions) -> Posted:
    """Open the repository's dynaudit discussion with the report, or update the report in the
    discussion a previous check opened (see the module docstring)."""
    return _keep_comment(_hub_repo(report), render_comment(report), options)


def render_error(revision: str, reason: str) -> str:
    """The comment that stands in for the report when a commit could not be checked (the
    registry receiver's jobs): why, in one escaped line; the next check replaces it."""
    from dynaudit.reports.escape import escape_markdown, markdown_code

    return (
        f"{MARKER}\n## dynaudit check: no verdict\n\n"
        f"Commit {markdown_code(revision)} could not be checked: {escape_markdown(reason)}\n"
        "\n---\n*The next check of this repository replaces this comment with its report.*\n"
    )


def post_error(source: str, reason: str, options: SourceOptions) -> Posted:
    """:func:`render_error` for ``source`` (``hf://org/name@commit``), in the same discussion
    and comment as the reports."""
    repo = require_hub_source(source, "posting to the Hub")
    return _keep_comment(repo, render_error(repo.revision or "main", reason), options)


def _keep_comment(repo: HubRepo, body: str, options: SourceOptions) -> Posted:
    from huggingface_hub.community import DiscussionComment

    api = _api(options)
    me = _user(api)
    title = discussion_title(repo)
    found = _ours(api, repo.repo_id, title, me, pull_request=False)
    if found is None:
        opened = api.create_discussion(repo.repo_id, title, description=body)
        return Posted("discussion", "opened", opened.url)
    details = api.get_discussion_details(repo.repo_id, found.num)
    kept = [
        event
        for event in details.events
        if isinstance(event, DiscussionComment)
        and event.author == me
        and not event.hidden
        and event.content.startswith(MARKER)
    ]
    if not kept:
        api.comment_discussion(repo.repo_id, found.num, body)
        return Posted("discussion", "commented", found.url)
    if kept[0].content.strip() == body.strip():
        return Posted("discussion", "unchanged", found.url)
    api.edit_discussion_comment(repo.repo_id, found.num, kept[0].id, body)
    return Posted("discussion", "updated", found.url)


def open_card_pr(report: CheckReport, options: SourceOptions) -> Posted:
    """Open a pull request on ``main`` whose model card carries :func:`card_block` under
    ``dynaudit:`` and whose description is the report; a later check updates the one still
    open (its card and its description) instead of opening another."""
    from huggingface_hub import CommitOperationAdd
    from huggingface_hub.community import DiscussionComment

    repo = _hub_repo(report)
    api = _api(options)
    me = _user(api)
    title = pr_title(repo)
    description = render_comment(report, "--hub-pr")
    card = _with_block(_read_card(api, repo.repo_id, _BASE), report, repo.repo_id)
    found = _ours(api, repo.repo_id, title, me, pull_request=True)
    if found is None:
        info = api.create_commit(
            repo.repo_id,
            [CommitOperationAdd(_CARD, card.encode())],
            commit_message=title,
            commit_description=description,
            revision=_BASE,
            create_pr=True,
        )
        return Posted("pull request", "opened", str(info.pr_url))
    branch = f"refs/pr/{found.num}"
    details = api.get_discussion_details(repo.repo_id, found.num)
    first = next((e for e in details.events if isinstance(e, DiscussionComment)), None)
    changed = _read_card(api, repo.repo_id, branch) != card
    if changed:
        api.create_commit(
            repo.repo_id,
            [CommitOperationAdd(_CARD, card.encode())],
            commit_message=title,
            revision=branch,
        )
    if changed and first is not None and first.author == me and first.content.startswith(MARKER):
        api.edit_discussion_comment(repo.repo_id, found.num, first.id, description)
    return Posted("pull request", "updated" if changed else "unchanged", found.url)


def _hub_repo(report: CheckReport) -> HubRepo:
    return require_hub_source(report.source.uri, "posting to the Hub")


def _repo_id(report: CheckReport) -> str:
    with contextlib.suppress(DynauditError):
        return _hub_repo(report).repo_id
    return printable(report.source.uri)


def _api(options: SourceOptions) -> HfApi:
    from huggingface_hub import HfApi

    return HfApi(endpoint=options.hf_endpoint, token=options.hf_token)


def _user(api: HfApi) -> str:
    """The name of the token's user: only what that user wrote is dynaudit's to update."""
    return str(api.whoami()["name"])


def _ours(
    api: HfApi, repo_id: str, title: str, me: str, *, pull_request: bool
) -> Discussion | None:
    """The newest open discussion (or pull request, open or draft) titled ``title`` that
    ``me`` opened; None when there is none."""
    kind: Literal["pull_request", "discussion"] = "pull_request" if pull_request else "discussion"
    for found in api.get_repo_discussions(repo_id, author=me, discussion_type=kind):
        if found.author == me and found.title == title and found.status in ("open", "draft"):
            return found
    return None


def _read_card(api: HfApi, repo_id: str, revision: str) -> str:
    """README.md at ``revision``, or "" when the repository has none."""
    from huggingface_hub import errors as hf

    missing = getattr(hf, "RemoteEntryNotFoundError", hf.EntryNotFoundError)
    try:
        path = api.hf_hub_download(repo_id, _CARD, revision=revision)
    except missing:
        return ""
    with open(path, encoding="utf-8") as fh:
        return fh.read()


def _with_block(text: str, report: CheckReport, repo_id: str) -> str:
    """The card ``text`` with its ``dynaudit:`` metadata set to :func:`card_block` (the rest
    of the front matter and the text kept; a card without front matter gets one). The front
    matter is checked as when ``base_model`` is read (size, depth, no aliases) first."""
    from huggingface_hub import RepoCard
    from huggingface_hub.repocard import REGEX_YAML_BLOCK

    found = REGEX_YAML_BLOCK.search(text)
    if found is not None:
        try:
            check_card_yaml(found.group(2))
        except ValueError as exc:
            raise DynauditError(f"{repo_id}: the model card's front matter: {exc}") from None
    with _quiet("huggingface_hub.repocard"):  # "no metadata block": one is added
        card = RepoCard(text)
    card.data[CARD_KEY] = card_block(report)
    return str(card)


@contextlib.contextmanager
def _quiet(name: str) -> Iterator[None]:
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _say(line: str) -> None:
    import sys

    from dynaudit.secrets import scrub

    print(scrub(printable(line)), file=sys.stderr, flush=True)


def _reason(exc: BaseException, options: SourceOptions) -> str:
    """One line saying what went wrong and what to do; the server's own words at most 200
    characters (the token is scrubbed from the warning as from every message)."""
    from huggingface_hub import constants
    from huggingface_hub import errors as hf

    from dynaudit.sources.hub import transport_errors

    endpoint = redact_url((options.hf_endpoint or constants.ENDPOINT).rstrip("/"))
    if isinstance(exc, DynauditError | _Stalled):
        return str(exc)
    if isinstance(exc, getattr(hf, "LocalTokenNotFoundError", ())):  # no token anywhere
        return "no Hub token: set HF_TOKEN (or --hf-token) to a token with write access"
    if isinstance(exc, hf.HfHubHTTPError) and exc.response is not None:
        status = exc.response.status_code
        lines = (exc.server_message or "").strip().splitlines()
        said = f": {lines[0][:200]}" if lines else ""
        if status in (401, 403):
            return (
                f"{endpoint} refused the token (HTTP {status}{said}); HF_TOKEN or --hf-token "
                "needs write access to the repository"
            )
        return f"{endpoint} answered HTTP {status}{said}"
    if isinstance(exc, transport_errors()):
        return f"cannot reach the Hub at {endpoint} ({type(exc).__name__})"
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}" + (f": {lines[0][:200]}" if lines else "")
