"""The Hugging Face Hub: ``hf://org/name[@revision]`` and bare ``org/name``.

Everything goes through the real ``huggingface_hub`` client: its cache, ``HF_TOKEN``,
``HF_ENDPOINT`` and ``HF_HUB_OFFLINE``. Only what an audit needs is downloaded — config,
index, adapter config, model card and the safetensors weights the index (or the usual file
names) point at; pickles never. The Hub's sha256 of each weight file is returned so the caller
can check the download against it.
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

from dynaudit.errors import AccessDenied, RemoteNotFound, SourceUnreachable, UsageError
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

__all__ = ["SCHEME", "HubRepo", "fetch", "open_remote_headers", "parse"]

SCHEME = "hf://"
_REPO = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[^\s@]+))?$")
_HEADER_PROBE = 64 * 1024  # first ranged read; most safetensors headers fit


@dataclass(frozen=True)
class HubRepo:
    uri: str  # as the user wrote it
    repo_id: str
    revision: str | None

    @property
    def label(self) -> str:
        return f"hf://{self.repo_id}" + (f"@{self.revision}" if self.revision else "")


def parse(text: str) -> HubRepo | None:
    """``hf://org/name[@rev]`` or a bare ``org/name[@rev]``; None when ``text`` is neither."""
    body = text[len(SCHEME) :] if text.startswith(SCHEME) else text
    match = _REPO.match(body)
    if match is None:
        if text.startswith(SCHEME):
            raise UsageError(f"{text}: not a Hub repository; expected hf://org/name[@revision]")
        return None
    return HubRepo(text, match["repo"], match["revision"])


def fetch(repo: HubRepo, options: SourceOptions) -> ResolvedSource:
    """Download what an audit reads into the Hugging Face cache (or find it there when
    ``HF_HUB_OFFLINE`` is set) and return the snapshot directory."""
    from huggingface_hub import constants, snapshot_download

    with _hub_errors(repo, options):
        if constants.HF_HUB_OFFLINE:
            folder = Path(
                snapshot_download(
                    repo.repo_id, revision=repo.revision, local_files_only=True,
                    allow_patterns=[glob.escape(name) for name in SIDE_FILES],
                )
            )  # fmt: skip
            return ResolvedSource(uri=repo.uri, path=folder, revision=folder.name)
        listing = _Listing.fetch(repo, options)
        selection = listing.selection(allow_pickle=options.allow_pickle)
        weights = [
            *([selection.index] if selection.pickle and selection.index else []),
            *selection.files,
        ]
        wanted = [name for name in SIDE_FILES if name in listing.files] + weights
        folder = Path(
            snapshot_download(
                repo.repo_id, revision=repo.revision or constants.DEFAULT_REVISION,
                endpoint=options.hf_endpoint, token=options.hf_token,
                allow_patterns=[glob.escape(name) for name in wanted], tqdm_class=_tqdm_class(),
            )
        )  # fmt: skip
    if folder.name != listing.commit:
        raise SourceUnreachable(
            f"{repo.uri}: the revision moved to another commit during the download; retry, "
            "or pin a commit with @<sha>"
        )
    expected = {n: f.lfs.sha256 for n in weights if (f := listing.files[n]).lfs is not None}
    return ResolvedSource(
        uri=repo.uri, path=folder, revision=listing.commit, expected_sha256=expected,
        unread_sha256={n: listing.vouched(n) for n in selection.others if n not in wanted},
        selection=selection,
    )  # fmt: skip


class RemoteCheckpoint(Checkpoint):
    """Tensor headers of a Hub checkpoint read with ranged requests; no tensor data."""

    def read(self, name: str) -> torch.Tensor:
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
        Path(repo.label), headers, config=config,
        weight_map=index.get("weight_map") if isinstance(index, dict) else None,
    )  # fmt: skip
    return repo.uri, checkpoint


@dataclass
class _Listing:
    """A repository's files at one commit (with sizes and LFS sha256), from one API call."""

    repo: HubRepo
    options: SourceOptions
    commit: str
    files: dict[str, Any]  # name → huggingface_hub.RepoSibling
    _json: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def fetch(cls, repo: HubRepo, options: SourceOptions) -> _Listing:
        from huggingface_hub import HfApi

        api = HfApi(endpoint=options.hf_endpoint, token=options.hf_token)
        info = api.model_info(repo.repo_id, revision=repo.revision, files_metadata=True)
        assert info.sha is not None
        return cls(repo, options, info.sha, {s.rfilename: s for s in info.siblings or []})

    def selection(self, allow_pickle: bool = False) -> WeightSelection:
        """The weight files, by the rule local directories follow (config.json's
        ``transformers_weights`` included)."""
        config = self.json("config.json") if "config.json" in self.files else None
        explicit = config.get("transformers_weights") if isinstance(config, dict) else None
        return weight_selection(
            self.repo.uri, set(self.files), self.json, allow_pickle=allow_pickle,
            explicit=explicit if isinstance(explicit, str) else None,
        )  # fmt: skip

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
                self.repo.repo_id, name, revision=self.commit, endpoint=self.options.hf_endpoint,
                token=self.options.hf_token,
            )  # fmt: skip
            self._json[name] = read_json(Path(path))
        return self._json[name]


def _read_range(repo: HubRepo, commit: str, name: str, options: SourceOptions, offset: int,
                length: int) -> bytes:  # fmt: skip
    """``length`` bytes of a Hub file from ``offset``, streamed and cut off: a server that
    ignores ``Range`` costs one connection, never the whole file."""
    from huggingface_hub import constants, get_session, hf_hub_url, hf_raise_for_status
    from huggingface_hub.utils import build_hf_headers  # type: ignore[attr-defined]

    url = hf_hub_url(repo.repo_id, name, revision=commit, endpoint=options.hf_endpoint)
    headers = {
        **build_hf_headers(token=options.hf_token),
        "Range": f"bytes={offset}-{offset + length - 1}",
    }
    data = bytearray()
    with get_session().stream(
        "GET",
        url,
        headers=headers,
        follow_redirects=True,
        timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT,
    ) as response:
        if response.status_code >= 400:
            response.read()
            hf_raise_for_status(response)
        if response.status_code != 206 and offset:
            raise SourceUnreachable(
                f"{repo.uri}: the endpoint ignores Range requests, so headers cannot be read "
                "alone; use `inspect --weights` to download the checkpoint"
            )
        for chunk in response.iter_bytes():
            data += chunk
            if len(data) >= length:
                break
    return bytes(data[:length])


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

    from dynaudit.terminal import interactive

    if interactive():
        return None

    class Quiet(tqdm):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **{**kwargs, "disable": True})  # type: ignore[no-untyped-call]

    return Quiet


def _transport_errors() -> tuple[type[BaseException], ...]:
    """The HTTP library's connection and timeout errors (httpx2 for huggingface_hub 2,
    httpx for 1)."""
    found: list[type[BaseException]] = []
    for module in ("httpx2", "httpx"):
        with contextlib.suppress(ImportError):
            found.append(importlib.import_module(module).TransportError)
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
            f"{uri}: not a valid Hub repository id or revision; expected hf://org/name[@revision]"
        ) from exc
    except hf.GatedRepoError as exc:
        raise AccessDenied(
            f"{uri}: {repo.repo_id} is gated; request access on the Hub, then set HF_TOKEN "
            "(or --hf-token) to a token of an account that has it"
        ) from exc
    except hf.RepositoryNotFoundError as exc:
        raise RemoteNotFound(
            f"{uri}: no repository {repo.repo_id!r} on {endpoint}, or it is private and no valid "
            "token was given (set HF_TOKEN or --hf-token)"
            + ("" if uri.startswith(SCHEME) else "; nor is it a local path")
        ) from exc
    except hf.RevisionNotFoundError as exc:
        raise RemoteNotFound(
            f"{uri}: {repo.repo_id} has no revision {repo.revision!r}; name an existing branch, "
            "tag or commit"
        ) from exc
    except hf.RemoteEntryNotFoundError as exc:
        raise RemoteNotFound(
            f"{uri}: a file the checkpoint needs is missing on the Hub "
            f"({_url_tail(exc)}); the upload looks incomplete"
        ) from exc
    except (hf.LocalEntryNotFoundError, hf.OfflineModeIsEnabled) as exc:
        if constants.HF_HUB_OFFLINE:
            raise SourceUnreachable(
                f"{uri}: HF_HUB_OFFLINE is set and the checkpoint is not (completely) in the "
                f"Hugging Face cache at {constants.HF_HUB_CACHE}; run once online, or unset "
                "HF_HUB_OFFLINE"
            ) from exc
        raise SourceUnreachable(
            f"{uri}: the download from {endpoint} failed and the files are not in the cache; "
            "check the network and retry"
        ) from exc
    except hf.HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        if status in (401, 403):
            raise AccessDenied(
                f"{uri}: {endpoint} refused the credentials (HTTP {status}); check HF_TOKEN "
                "or --hf-token"
            ) from exc
        raise SourceUnreachable(
            f"{uri}: {endpoint} answered HTTP {status}; retry later or check --hf-endpoint"
        ) from exc
    except _transport_errors() as exc:
        raise SourceUnreachable(
            f"{uri}: cannot reach the Hugging Face Hub at {endpoint} ({type(exc).__name__}); "
            "check --hf-endpoint / HF_ENDPOINT and the network, or set HF_HUB_OFFLINE=1 to use "
            "the local cache"
        ) from exc


def _url_tail(exc: BaseException) -> str:
    response = getattr(exc, "response", None)
    url = str(response.url) if response is not None else ""
    return url.rsplit("/resolve/", 1)[-1] if "/resolve/" in url else type(exc).__name__
