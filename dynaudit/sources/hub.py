"""The Hugging Face Hub: ``hf://org/name[@revision][/path]`` and bare ``org/name``.

Everything goes through the real ``huggingface_hub`` client: its cache, ``HF_TOKEN``,
``HF_ENDPOINT`` and ``HF_HUB_OFFLINE``. Only what an audit needs is downloaded — config,
index, adapter config, model card and the safetensors weights the index (or the usual file
names) point at; pickles never. The Hub's sha256 of each weight file is returned so the caller
can check the download against it. URIs are read by the rules of ``HfFileSystem``: ``/path``
after the repository (or its revision) is the folder holding the checkpoint.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import importlib
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from dynaudit.errors import (
    AccessDenied,
    CorruptCheckpoint,
    DynauditError,
    RemoteNotFound,
    SourceUnreachable,
    UsageError,
)
from dynaudit.sources.base import (
    SIDE_FILES,
    ResolvedSource,
    SourceOptions,
    redact_url,
    weight_selection,
)
from dynaudit.tensors import Checkpoint, WeightSelection, parse_header, read_json

if TYPE_CHECKING:
    import torch

__all__ = [
    "SCHEME",
    "HubRepo",
    "card_base_model",
    "check_card_yaml",
    "fetch",
    "open_remote_headers",
    "parse",
    "transport_errors",
]

SCHEME = "hf://"
FORM = "hf://org/name[@revision][/path]"
_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*$")  # one half of a repository id
# Revisions that hold a "/" and are matched whole before the rest is split into
# <revision>/<path> (HfFileSystem's rule): pull requests and the Hub's conversions.
_SPECIAL_REF = re.compile(r"^refs/(?:convert/[\w.-]+|pr/\d+)")
_OTHER_KINDS = {"datasets": "dataset", "spaces": "Space", "kernels": "kernel", "buckets": "bucket"}
_HEADER_PROBE = 64 * 1024  # first ranged read; most safetensors headers fit
_CARD_YAML_LIMIT = 256 * 1024  # front matter parsed at most (real cards: a few KiB)
_CARD_YAML_DEPTH = 64


@dataclass(frozen=True)
class HubRepo:
    uri: str  # as the user wrote it (with --revision folded in)
    repo_id: str
    revision: str | None
    subfolder: str = ""  # the folder of the repository that holds the checkpoint

    @property
    def label(self) -> str:
        return pinned_uri(self.repo_id, self.revision, self.subfolder)

    def path(self, name: str) -> str:
        """A file of the checkpoint as a path in the repository."""
        return f"{self.subfolder}/{name}" if self.subfolder else name


class _Malformed(ValueError):
    """SOURCE is not of the Hub's form (a bare one may still be a mistyped local path)."""


class _Refused(_Malformed):
    """SOURCE is of the Hub's form but cannot be audited as given, written bare or not."""


def parse(text: str, revision: str | None = None) -> HubRepo | None:
    """``hf://org/name[@rev][/path]`` or the same without ``hf://``, read as ``HfFileSystem``
    reads it; ``revision`` is ``--revision``, which must agree with an ``@rev`` in ``text``.
    None when a bare ``text`` is not of that form (``hf://`` text is a usage error)."""
    explicit = text.startswith(SCHEME)
    location = text[len(SCHEME) :].strip("/") if explicit else text.rstrip("/")
    try:
        repo_id, found, subfolder = _split(location, revision)
    except _Malformed as exc:
        if explicit or isinstance(exc, _Refused):
            raise UsageError(f"{text}: {exc}", uri=text) from None
        return None
    return HubRepo(text, repo_id, found, subfolder)


def pinned_uri(repo_id: str, revision: str | None, subfolder: str = "") -> str:
    """The ``hf://`` URI naming ``revision`` of ``repo_id`` (and a folder in it) that
    :func:`parse` reads back: a ``/`` or ``%`` in a branch name is percent-encoded, as
    ``HfFileSystem`` writes it; ``refs/pr/N`` stays as it is."""
    uri = SCHEME + repo_id
    if revision is not None:
        special = _SPECIAL_REF.fullmatch(revision) is not None
        uri += "@" + (revision if special else revision.replace("%", "%25").replace("/", "%2F"))
    return uri + (f"/{subfolder}" if subfolder else "")


def _split(location: str, revision: str | None) -> tuple[str, str | None, str]:
    """``[models/]org/name[@rev][/path]`` → (repo id, revision, path), by HfFileSystem's
    rules: an ``@`` counts only right after ``org/name``."""
    first, _, rest = location.partition("/")
    if first in _OTHER_KINDS and rest:
        raise _Refused(
            f"a Hub {_OTHER_KINDS[first]} ({first}/…), not a model; dynaudit audits model "
            f"repositories: {FORM}"
        )
    if first == "models" and rest:
        location = rest
    at = location.find("@")
    if at == -1 or location[:at].count("/") > 1:
        parts = location.split("/", 2)
        repo_id, found, path = "/".join(parts[:2]), None, "/".join(parts[2:])
    else:
        repo_id = location[:at]
        found, path = _revision_and_path(location[at + 1 :], revision)
    _check_repo_id(repo_id)
    _check_path(path)
    for named in (found, revision):
        _check_revision(named)
    if revision is not None and found is not None and found != revision:
        raise _Refused(f"--revision {revision!r} differs from the revision {found!r} in the URI")
    return repo_id, found if found is not None else revision, path


def _revision_and_path(tail: str, revision: str | None) -> tuple[str, str]:
    """What follows ``@``: a special ref (``refs/pr/1``) is matched whole, unless
    ``--revision`` names another (a branch named ``refs``); else the revision ends at the
    first ``/``. The revision is URL-decoded (``refs%2Fpr%2F1``)."""
    special = _SPECIAL_REF.match(tail)
    if special and revision in (None, special.group()):
        raw, path = special.group(), tail[special.end() :].removeprefix("/")
    else:
        raw, _, path = tail.partition("/")
    if not raw:
        raise _Malformed(f"no revision after '@'; expected {FORM}")
    return unquote(raw), path


def _check_repo_id(repo_id: str) -> None:
    halves = repo_id.split("/")
    if len(halves) != 2 or not all(_NAME.match(half) for half in halves):
        raise _Malformed(f"not a Hub repository; expected {FORM}")


def _check_path(path: str) -> None:
    """A folder inside the repository: no empty, ``.`` or ``..`` segment, no backslash (it is
    joined to the local snapshot directory)."""
    if path and ("\\" in path or any(part in ("", ".", "..") for part in path.split("/"))):
        raise _Malformed(f"the path {path!r} is not a folder of the repository; expected {FORM}")


def _check_revision(revision: str | None) -> None:
    """A branch, tag, commit or ``refs/…`` name by git's rules for ref names: huggingface_hub
    joins it to the cache folder (``refs/<revision>``, read offline and written online), so
    ``..``, an absolute name, a backslash or a control character could leave that folder."""
    if revision is None:
        return
    parts = revision.split("/")
    bad = (
        not revision
        or revision.startswith("/")
        or "\\" in revision
        or any(part in ("", ".", "..") for part in parts)
        or any(ord(c) < 32 or ord(c) == 127 for c in revision)
    )
    if bad:
        raise _Refused(f"{revision!r} is not a revision (a branch, tag, commit or refs/pr/N)")


def fetch(repo: HubRepo, options: SourceOptions) -> ResolvedSource:
    """Download what an audit reads into the Hugging Face cache (or find it there when
    ``HF_HUB_OFFLINE`` is set) and return the snapshot directory."""
    from huggingface_hub import constants, snapshot_download

    with _hub_errors(repo, options):
        if constants.HF_HUB_OFFLINE:
            folder = Path(
                snapshot_download(
                    repo.repo_id,
                    revision=repo.revision,
                    local_files_only=True,
                    allow_patterns=[glob.escape(repo.path(name)) for name in SIDE_FILES],
                )
            )
            if not (folder / repo.subfolder).is_dir():
                raise _offline_miss(repo)
            return ResolvedSource(uri=repo.uri, path=folder / repo.subfolder, revision=folder.name)
        listing = _Listing.fetch(repo, options)
        selection = listing.selection(allow_pickle=options.allow_pickle)
        weights = [
            *([selection.index] if selection.pickle and selection.index else []),
            *selection.files,
        ]
        wanted = [name for name in SIDE_FILES if name in listing.files] + weights
        folder = Path(
            snapshot_download(
                repo.repo_id,
                revision=repo.revision or constants.DEFAULT_REVISION,
                endpoint=options.hf_endpoint,
                token=options.hf_token,
                allow_patterns=[glob.escape(repo.path(name)) for name in wanted],
                tqdm_class=_tqdm_class(),
            )
        )
    if folder.name != listing.commit:
        raise SourceUnreachable(
            f"{repo.uri}: the revision moved to another commit during the download; retry, "
            "or pin a commit with @<sha>",
            uri=repo.uri,
        )
    expected = {n: f.lfs.sha256 for n in weights if (f := listing.files[n]).lfs is not None}
    return ResolvedSource(
        uri=repo.uri,
        path=folder / repo.subfolder,
        revision=listing.commit,
        expected_sha256=expected,
        unread_sha256={n: listing.vouched(n) for n in selection.others if n not in wanted},
        selection=selection,
    )


def card_base_model(text: str, where: str) -> str | None:
    """``base_model`` of a model card (README.md), read by ``huggingface_hub``'s ``ModelCard``
    (a string, or the first of a list); None when the card declares none. ``where`` names the
    card in errors. A card whose front matter does not parse is exit 3, naming it."""
    from huggingface_hub import ModelCard
    from huggingface_hub.repocard import REGEX_YAML_BLOCK

    found = REGEX_YAML_BLOCK.search(text)
    if found is None:
        return None  # no front matter (ModelCard would log a warning)
    block = found.group(2)
    try:
        check_card_yaml(block)
        with _quiet("huggingface_hub.repocard", "huggingface_hub.repocard_data"):
            card = ModelCard(f"---\n{block}\n---\n", ignore_metadata_errors=True)
        named = card.data.get("base_model")
    except Exception as exc:  # the card is the checkpoint author's: any failure is theirs
        problem = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise CorruptCheckpoint(
            f"{where}: the model card's YAML front matter cannot be read ({problem[:200]})",
            path=where,
        ) from None
    if isinstance(named, list):
        named = named[0] if named else None
    return (named.strip() or None) if isinstance(named, str) else None


def check_card_yaml(block: str) -> None:
    """What ``yaml.safe_load`` and ``ModelCardData`` would choke on, refused from the tokens
    first: a front matter over the size bound, nesting deeper than a card ever needs (PyYAML
    recurses, and its scanner slows down quadratically with depth), and aliases, which
    ``ModelCardData`` would expand while walking ``model-index`` (a few lines can mean 10⁹
    entries)."""
    import yaml

    if len(block) > _CARD_YAML_LIMIT:
        raise ValueError(f"front matter over {_CARD_YAML_LIMIT // 1024} KiB")
    opening = (
        yaml.BlockSequenceStartToken,
        yaml.BlockMappingStartToken,
        yaml.FlowSequenceStartToken,
        yaml.FlowMappingStartToken,
    )
    closing = (yaml.BlockEndToken, yaml.FlowSequenceEndToken, yaml.FlowMappingEndToken)
    depth = 0
    for token in yaml.scan(block):
        if isinstance(token, yaml.AliasToken):
            raise ValueError("YAML aliases (*name) are not accepted")
        depth += isinstance(token, opening) - isinstance(token, closing)
        if depth > _CARD_YAML_DEPTH:
            raise ValueError(f"nested deeper than {_CARD_YAML_DEPTH} levels")


@contextlib.contextmanager
def _quiet(*loggers: str) -> Iterator[None]:
    """huggingface_hub's warnings about parts of a card dynaudit does not read (an invalid
    ``model-index``) kept off stderr while the card is parsed."""
    import logging

    saved = [(logging.getLogger(name), logging.getLogger(name).level) for name in loggers]
    for logger, _ in saved:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in saved:
            logger.setLevel(level)


class RemoteCheckpoint(Checkpoint):
    """Tensor headers of a Hub checkpoint read with ranged requests; no tensor data."""

    def read(self, name: str, index: int | None = None) -> torch.Tensor:
        raise UsageError(f"{self.root}: only the headers were fetched; resolve it to read weights")


def open_remote_headers(repo: HubRepo, options: SourceOptions) -> tuple[str, Checkpoint] | None:
    """Headers of every weight file of a Hub model, read with ranged GETs (a few KiB per
    file) and validated like local ones; ``None`` when they cannot be read that way (an
    adapter, whose base must be opened too; pickles, which have no header; offline)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return None
    with _hub_errors(repo, options):
        listing = _Listing.fetch(repo, options)
        names = listing.files
        if "adapter_config.json" in names or not any(n.endswith(".safetensors") for n in names):
            return None
        selection = listing.selection(allow_pickle=True)
        if selection.pickle:
            return None
        headers = []
        for name in selection.files:
            size = names[name].size or 0
            read = _prefetched(functools.partial(_read_range, repo, listing.commit, name, options))
            headers.append((Path(name), *parse_header(Path(name), size, read)))
        config = listing.json("config.json") if "config.json" in names else None
        index = listing.json(selection.index) if selection.index else None
    checkpoint = RemoteCheckpoint.assemble(
        Path(repo.label),
        headers,
        config=config,
        weight_map=index.get("weight_map") if isinstance(index, dict) else None,
    )
    return repo.uri, checkpoint


@dataclass
class _Listing:
    """A repository's files at one commit (with sizes and LFS sha256), from one API call."""

    repo: HubRepo
    options: SourceOptions
    commit: str
    files: dict[str, Any]  # name in the checkpoint's folder → huggingface_hub.RepoSibling
    _json: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def fetch(cls, repo: HubRepo, options: SourceOptions) -> _Listing:
        """The listing of the checkpoint's folder (the repository's root, or ``/path``)."""
        from huggingface_hub import HfApi

        api = HfApi(endpoint=options.hf_endpoint, token=options.hf_token)
        info = api.model_info(repo.repo_id, revision=repo.revision, files_metadata=True)
        assert info.sha is not None
        siblings = {s.rfilename: s for s in info.siblings or []}
        if not repo.subfolder:
            return cls(repo, options, info.sha, siblings)
        prefix = repo.subfolder + "/"
        inside = {n[len(prefix) :]: s for n, s in siblings.items() if n.startswith(prefix)}
        if repo.subfolder in siblings:
            raise UsageError(
                f"{repo.uri}: {repo.subfolder!r} is a file; name the folder that holds the "
                f"checkpoint ({FORM})",
                uri=repo.uri,
            )
        if not inside:
            raise RemoteNotFound(
                f"{repo.uri}: {repo.repo_id} has no folder {repo.subfolder!r} at this revision",
                uri=repo.uri,
            )
        return cls(repo, options, info.sha, inside)

    def selection(self, allow_pickle: bool = False) -> WeightSelection:
        """The weight files, by the rule local directories follow (config.json's
        ``transformers_weights`` included)."""
        config = self.json("config.json") if "config.json" in self.files else None
        explicit = config.get("transformers_weights") if isinstance(config, dict) else None
        return weight_selection(
            self.repo.uri,
            set(self.files),
            self.json,
            allow_pickle=allow_pickle,
            explicit=explicit if isinstance(explicit, str) else None,
        )

    def vouched(self, name: str) -> str:
        """What the Hub vouches a file's content is: its LFS sha256, else its git blob id."""
        sibling = self.files[name]
        if sibling.lfs is not None:
            return str(sibling.lfs.sha256)
        return f"git-blob:{sibling.blob_id}"

    def json(self, name: str) -> Any:
        """A small JSON file of the commit, through the client's cache."""
        from huggingface_hub import hf_hub_download

        if name not in self._json:
            path = hf_hub_download(
                self.repo.repo_id,
                self.repo.path(name),
                revision=self.commit,
                endpoint=self.options.hf_endpoint,
                token=self.options.hf_token,
            )
            self._json[name] = read_json(Path(path))
        return self._json[name]


def _read_range(
    repo: HubRepo, commit: str, name: str, options: SourceOptions, offset: int, length: int
) -> bytes:
    """``length`` bytes of a Hub file from ``offset``, streamed and cut off: a server that
    ignores ``Range`` costs one connection, never the whole file. (huggingface_hub's
    ``parse_safetensors_file_metadata`` reads the whole response body, so it is not used.)"""
    from huggingface_hub import hf_hub_url
    from huggingface_hub.utils import build_hf_headers  # type: ignore[attr-defined]

    url = hf_hub_url(repo.repo_id, repo.path(name), revision=commit, endpoint=options.hf_endpoint)
    headers = {
        **build_hf_headers(token=options.hf_token),
        "Range": f"bytes={offset}-{offset + length - 1}",
    }
    data = bytearray()
    with _streamed_get(url, headers) as (status, chunks):
        if status != 206 and offset:
            raise SourceUnreachable(
                f"{repo.uri}: the endpoint ignores Range requests, so headers cannot be read "
                "alone; use `inspect --weights` to download the checkpoint",
                uri=repo.uri,
            )
        for chunk in chunks:
            data += chunk
            if len(data) >= length:
                break
    return bytes(data[:length])


@contextlib.contextmanager
def _streamed_get(url: str, headers: dict[str, str]) -> Iterator[tuple[int, Iterator[bytes]]]:
    """A GET through the client's own session, its body read chunk by chunk as the caller
    asks: httpx (huggingface_hub 1 and later) or requests (0.x). HTTP errors are raised as
    the client's own exceptions."""
    from huggingface_hub import constants, get_session
    from huggingface_hub.utils import hf_raise_for_status  # type: ignore[attr-defined]

    session: Any = get_session()
    timeout = constants.HF_HUB_DOWNLOAD_TIMEOUT
    httpx = callable(getattr(session, "stream", None))  # requests has a bool there
    if httpx:
        opened = session.stream("GET", url, headers=headers, follow_redirects=True, timeout=timeout)
    else:
        opened = session.get(
            url, headers=headers, stream=True, allow_redirects=True, timeout=timeout
        )
    with opened as response:
        if response.status_code >= 400:
            if httpx:
                response.read()  # the error's body, which the client's message quotes
            hf_raise_for_status(response)
        chunks = response.iter_bytes() if httpx else response.iter_content(_HEADER_PROBE)
        yield response.status_code, chunks


def _prefetched(read: Callable[[int, int], bytes]) -> Callable[[int, int], bytes]:
    """Serve the 8-byte length and the header from one ranged request when they fit in it."""
    head = b""

    def cached(offset: int, length: int) -> bytes:
        nonlocal head
        if offset == 0:
            head = read(0, max(length, _HEADER_PROBE))
            return head[:length]
        if offset + length <= len(head):
            return head[offset : offset + length]
        return read(offset, length)

    return cached


def _tqdm_class() -> Any:
    """The client's progress bars on an interactive terminal; silence in CI logs and pipes."""
    from huggingface_hub.utils import tqdm  # type: ignore[attr-defined]

    from dynaudit.console import interactive

    if interactive():
        return None

    class Quiet(tqdm):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **{**kwargs, "disable": True})  # type: ignore[no-untyped-call]

    return Quiet


def transport_errors() -> tuple[type[BaseException], ...]:
    """The HTTP library's connection and timeout errors (httpx2 for huggingface_hub 2,
    httpx for 1, requests for 0.x; huggingface_hub's own HTTP errors are caught before)."""
    found: list[type[BaseException]] = []
    for module, name in (
        ("httpx2", "TransportError"),
        ("httpx", "TransportError"),
        ("requests", "RequestException"),
    ):
        with contextlib.suppress(ImportError):
            found.append(getattr(importlib.import_module(module), name))
    return tuple(found)


@contextlib.contextmanager
def _hub_errors(repo: HubRepo, options: SourceOptions) -> Iterator[None]:
    """Turn the client's exceptions into one-line input errors that say what to do."""
    from huggingface_hub import constants
    from huggingface_hub import errors as hf

    endpoint = redact_url((options.hf_endpoint or constants.ENDPOINT).rstrip("/"))
    uri = repo.uri
    try:
        yield
    except hf.HFValidationError as exc:
        raise UsageError(
            f"{uri}: not a valid Hub repository id or revision; expected hf://org/name[@revision]",
            uri=uri,
        ) from exc
    except hf.GatedRepoError as exc:
        raise AccessDenied(
            f"{uri}: {repo.repo_id} is gated; request access on the Hub, then set HF_TOKEN "
            "(or --hf-token) to a token of an account that has it",
            uri=uri,
        ) from exc
    except hf.RepositoryNotFoundError as exc:
        raise RemoteNotFound(
            f"{uri}: no repository {repo.repo_id!r} on {endpoint}, or it is private and no valid "
            "token was given (set HF_TOKEN or --hf-token)"
            + ("" if uri.startswith(SCHEME) else "; nor is it a local path"),
            uri=uri,
        ) from exc
    except hf.RevisionNotFoundError as exc:
        raise RemoteNotFound(
            f"{uri}: {repo.repo_id} has no revision {repo.revision!r}; name an existing branch, "
            "tag or commit",
            uri=uri,
        ) from exc
    except (hf.LocalEntryNotFoundError, hf.OfflineModeIsEnabled) as exc:  # before: in 0.x
        raise _not_cached(repo, endpoint, offline=constants.HF_HUB_OFFLINE) from exc
    except getattr(hf, "RemoteEntryNotFoundError", hf.EntryNotFoundError) as exc:  # 1.x; 0.x
        raise RemoteNotFound(
            f"{uri}: a file the checkpoint needs is missing on the Hub "
            f"({_url_tail(exc)}); the upload looks incomplete",
            uri=uri,
        ) from exc
    except hf.HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        raise _http_error(uri, endpoint, status) from exc
    except transport_errors() as exc:
        raise SourceUnreachable(
            f"{uri}: cannot reach the Hugging Face Hub at {endpoint} ({type(exc).__name__}); "
            "check --hf-endpoint / HF_ENDPOINT and the network, or set HF_HUB_OFFLINE=1 to use "
            "the local cache",
            uri=uri,
        ) from exc
    except DynauditError:
        raise
    except ValueError as exc:  # an endpoint that is not a Hub: an answer that is not its JSON
        raise SourceUnreachable(
            f"{uri}: {endpoint} did not answer as a Hugging Face Hub ({type(exc).__name__}); "
            "check --hf-endpoint / HF_ENDPOINT",
            uri=uri,
        ) from exc


def _not_cached(repo: HubRepo, endpoint: str, *, offline: bool) -> SourceUnreachable:
    """A download that failed with the files not in the cache: offline mode (both errors are
    EntryNotFound and HTTP errors too), or the network."""
    if offline:
        return _offline_miss(repo)
    return SourceUnreachable(
        f"{repo.uri}: the download from {endpoint} failed and the files are not in the cache; "
        "check the network and retry",
        uri=repo.uri,
    )


def _http_error(uri: str, endpoint: str, status: int | None) -> AccessDenied | SourceUnreachable:
    if status in (401, 403):
        return AccessDenied(
            f"{uri}: {endpoint} refused the credentials (HTTP {status}); check HF_TOKEN "
            "or --hf-token",
            uri=uri,
        )
    return SourceUnreachable(
        f"{uri}: {endpoint} answered HTTP {status}; retry later or check --hf-endpoint", uri=uri
    )


def _offline_miss(repo: HubRepo) -> SourceUnreachable:
    from huggingface_hub import constants

    return SourceUnreachable(
        f"{repo.uri}: HF_HUB_OFFLINE is set and the checkpoint is not (completely) in the "
        f"Hugging Face cache at {constants.HF_HUB_CACHE}; run once online, or unset "
        "HF_HUB_OFFLINE",
        uri=repo.uri,
    )


def _url_tail(exc: BaseException) -> str:
    response = getattr(exc, "response", None)
    url = str(response.url) if response is not None else ""
    return url.rsplit("/resolve/", 1)[-1] if "/resolve/" in url else type(exc).__name__
