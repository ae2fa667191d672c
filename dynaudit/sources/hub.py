"""The Hugging Face Hub: ``hf://org/name[@revision]`` and bare ``org/name``.

Everything goes through the real ``huggingface_hub`` client: its cache, ``HF_TOKEN``,
``HF_ENDPOINT`` and ``HF_HUB_OFFLINE``. Only what an audit needs is downloaded — config,
index, adapter config, model card and the safetensors weights the index (or the usual file
names) point at; pickles never. The Hub's sha256 of each weight file is returned so the caller
can check the download against it.
"""

from __future__ import annotations

import contextlib
import glob
import importlib
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dynaudit.errors import AccessDenied, RemoteNotFound, SourceUnreachable, UsageError
from dynaudit.sources.base import SIDE_FILES, ResolvedSource, SourceOptions, weight_files
from dynaudit.tensors import Checkpoint, TensorInfo, parse_header, read_json

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
    from huggingface_hub import HfApi, constants, snapshot_download

    with _hub_errors(repo, options):
        if constants.HF_HUB_OFFLINE:
            folder = Path(
                snapshot_download(
                    repo.repo_id, revision=repo.revision, local_files_only=True,
                    allow_patterns=[glob.escape(name) for name in SIDE_FILES],
                )
            )  # fmt: skip
            return ResolvedSource(uri=repo.uri, path=folder, revision=folder.name)
        api = HfApi(endpoint=options.hf_endpoint, token=options.hf_token)
        info = api.model_info(repo.repo_id, revision=repo.revision, files_metadata=True)
        assert info.sha is not None
        commit = info.sha
        files = {sibling.rfilename: sibling for sibling in info.siblings or []}
        weights = weight_files(
            repo.uri, set(files), lambda name: _download_index(repo, name, commit, options),
            allow_pickle=options.allow_pickle,
        )  # fmt: skip
        wanted = [name for name in SIDE_FILES if name in files] + weights
        folder = Path(
            snapshot_download(
                repo.repo_id, revision=repo.revision or constants.DEFAULT_REVISION,
                endpoint=options.hf_endpoint, token=options.hf_token,
                allow_patterns=[glob.escape(name) for name in wanted], tqdm_class=_tqdm_class(),
            )
        )  # fmt: skip
    if folder.name != info.sha:
        raise SourceUnreachable(
            f"{repo.uri}: the revision moved to another commit during the download; retry, "
            "or pin a commit with @<sha>"
        )
    expected = {n: f.lfs.sha256 for n in weights if (f := files[n]).lfs is not None}
    return ResolvedSource(uri=repo.uri, path=folder, revision=info.sha, expected_sha256=expected)


class RemoteCheckpoint(Checkpoint):
    """Tensor headers of a Hub checkpoint read with ranged requests; no tensor data."""

    def read(self, name: str) -> torch.Tensor:
        raise UsageError(f"{self.root}: only the headers were fetched; resolve it to read weights")


def open_remote_headers(repo: HubRepo, options: SourceOptions) -> tuple[str, Checkpoint] | None:
    """Headers of every weight file of a Hub model, read with ranged GETs (a few KiB per
    file); ``None`` for an adapter repo, whose base must be opened as well."""
    from huggingface_hub import (
        HfApi,
        constants,
        get_session,
        hf_hub_download,
        hf_hub_url,
        hf_raise_for_status,
    )
    from huggingface_hub.utils import build_hf_headers  # type: ignore[attr-defined]

    if constants.HF_HUB_OFFLINE:
        return None  # the cache has what there is; open it as usual
    with _hub_errors(repo, options):
        api = HfApi(endpoint=options.hf_endpoint, token=options.hf_token)
        info = api.model_info(repo.repo_id, revision=repo.revision, files_metadata=True)
        assert info.sha is not None
        commit = info.sha
        files = {sibling.rfilename: sibling for sibling in info.siblings or []}
        if "adapter_config.json" in files or not any(n.endswith(".safetensors") for n in files):
            return None  # an adapter needs its base; pickles have no header to read remotely
        weights = weight_files(
            repo.uri, set(files), lambda name: _download_index(repo, name, commit, options)
        )
        headers = build_hf_headers(token=options.hf_token)
        tensors: dict[str, TensorInfo] = {}
        metadata: dict[str, str] = {}
        for name in weights:
            url = hf_hub_url(repo.repo_id, name, revision=commit, endpoint=options.hf_endpoint)
            size = files[name].size or 0

            def read(offset: int, length: int, url: str = url) -> bytes:
                last = offset + max(length, _HEADER_PROBE if offset == 0 else length) - 1
                response = get_session().get(
                    url, headers={**headers, "Range": f"bytes={offset}-{last}"},
                    follow_redirects=True, timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT,
                )  # fmt: skip
                hf_raise_for_status(response)
                return bytes(response.content[:length])

            found, meta = parse_header(Path(name), size, _prefetched(read))
            tensors.update(found)
            metadata.update(meta)
        config = None
        if "config.json" in files:
            config = read_json(
                Path(
                    hf_hub_download(
                        repo.repo_id, "config.json", revision=commit,
                        endpoint=options.hf_endpoint, token=options.hf_token,
                    )
                )
            )  # fmt: skip
    checkpoint = RemoteCheckpoint(
        root=Path(f"{repo.label}"),
        files=[Path(name) for name in weights],
        tensors=tensors,
        config=config if isinstance(config, dict) else None,
        metadata=metadata,
    )
    return repo.uri, checkpoint


def _prefetched(read: Any) -> Any:
    """Serve the 8-byte length and the header from one ranged request when they fit in it."""
    cache: dict[str, bytes] = {}

    def cached(offset: int, length: int) -> bytes:
        if offset == 0:
            cache["head"] = read(0, _HEADER_PROBE)
            return cache["head"][:length]
        head = cache.get("head", b"")
        if offset + length <= len(head):
            return head[offset : offset + length]
        return bytes(read(offset, length))

    return cached


def _download_index(repo: HubRepo, name: str, commit: str, options: SourceOptions) -> Any:
    from huggingface_hub import hf_hub_download

    path = hf_hub_download(
        repo.repo_id, name, revision=commit, endpoint=options.hf_endpoint,
        token=options.hf_token,
    )  # fmt: skip
    return read_json(Path(path))


def _tqdm_class() -> Any:
    """The client's progress bars on an interactive terminal; silence in CI logs and pipes."""
    import os

    from huggingface_hub.utils import tqdm  # type: ignore[attr-defined]

    ci = os.environ.get("CI", "").lower() not in ("", "0", "false")
    if sys.stderr.isatty() and not ci:
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

    endpoint = (options.hf_endpoint or constants.ENDPOINT).rstrip("/")
    uri = repo.uri
    try:
        yield
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
        raise SourceUnreachable(
            f"{uri}: HF_HUB_OFFLINE is set and the checkpoint is not (completely) in the "
            f"Hugging Face cache at {constants.HF_HUB_CACHE}; run once online, or unset "
            "HF_HUB_OFFLINE"
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
