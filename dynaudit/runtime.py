"""Device choice and scoped torch settings. The CUDA-specific parts are kept here, small."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

from dynaudit.errors import UsageError

__all__ = ["pick_device", "to_device", "torch_scope"]


def pick_device(name: str) -> torch.device:
    """``auto`` → cuda when available, else cpu. Asking for cuda without one is a usage error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available (use --device cpu or auto)")
    return torch.device(name)


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device``. To a GPU it goes through pinned memory without blocking
    the host (the copy is ordered before later work on the same stream); elsewhere it is
    returned as it is."""
    if x.device == device or device.type != "cuda":
        return x
    return x.pin_memory().to(device, non_blocking=True)


@contextlib.contextmanager
def torch_scope(device: torch.device, threads: int | None) -> Iterator[None]:
    """Set the thread count and deterministic cuBLAS for the duration, then restore them."""
    old_threads = torch.get_num_threads()
    old_workspace = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    if threads is not None:
        torch.set_num_threads(threads)
    if device.type == "cuda" and old_workspace is None:
        # cuBLAS is only deterministic with a fixed workspace; read when a handle is created.
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
    try:
        with torch.no_grad():
            yield
    finally:
        torch.set_num_threads(old_threads)
        if device.type == "cuda" and old_workspace is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
