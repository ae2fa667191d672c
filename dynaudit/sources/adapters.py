"""PEFT LoRA adapters, audited as the merged weights ``W0 + scale · B·A`` over their base.

The merge happens tensor by tensor as layers are read: the base checkpoint stays on disk and
only the layer being fitted is merged in memory. Variants are merged exactly or refused
(exit 3), never guessed: rsLoRA (``alpha / √r``), ``rank_pattern``/``alpha_pattern`` (PEFT's
own matching: a pattern matches a module whose name ends in ``.pattern`` or equals it; the
first matching key wins), ``fan_in_fan_out`` (weights stored transposed, GPT-2 ``Conv1D``),
``modules_to_save`` (full tensors replacing the base's). DoRA and other variants are refused.

adapter_config.json is untrusted input: a rank that is not a positive integer, an alpha that
is not a finite number, a pattern that is not a regular expression, factors whose shapes do not
multiply to the base weight, an adapter whose base is (through other adapters) itself — each is
refused with one line (exit 3) naming the file, the key and the value.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dynaudit.errors import AdapterRefused
from dynaudit.tensors import Checkpoint, read_json

if TYPE_CHECKING:
    import torch

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "AdapterCheckpoint",
    "AdapterRefused",
    "AdapterSettings",
    "is_adapter",
    "merge_adapter",
    "opening",
    "read_adapter",
]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."
# Settings that change the merged weights in ways this module does not implement.
_UNSUPPORTED = {
    "use_dora": "DoRA rescales every column by a learned magnitude",
    "layer_replication": "layer replication duplicates base layers",
    "lora_bias": "LoRA biases",
    "use_qalora": "QA-LoRA",
    "trainable_token_indices": "trainable token indices",
    "target_parameters": "LoRA on raw parameters (target_parameters)",
    "alora_invocation_tokens": "activated LoRA",
    "arrow_config": "Arrow routing",
    "use_bdlora": "block-diagonal LoRA",
}
_LORA_KEY = re.compile(
    r"^(?P<module>.+)\.(?:(?P<kind>lora_A|lora_B)\.weight|(?P<emb>lora_embedding_A|lora_embedding_B))$"
)


# Adapter directories being opened, outermost first: an adapter's base may be an adapter too.
_OPENING: ContextVar[tuple[Path, ...]] = ContextVar("dynaudit_adapters_opening", default=())
_MAX_CHAIN = 16  # adapters stacked over adapters deeper than this are refused


@dataclass(frozen=True)
class AdapterSettings:
    """The merge-relevant keys of adapter_config.json, validated."""

    rank: int
    alpha: float
    rank_pattern: list[tuple[re.Pattern[str], int]]
    alpha_pattern: list[tuple[re.Pattern[str], float]]
    rslora: bool
    fan_in_fan_out: bool
    base: str | None


def is_adapter(path: Path) -> bool:
    return path.is_dir() and (path / ADAPTER_CONFIG).is_file()


@dataclass
class _Delta:
    a: str  # adapter tensor names
    b: str
    scale: float
    embedding: bool


@dataclass
class AdapterCheckpoint(Checkpoint):
    """The base checkpoint with the adapter merged in on read."""

    adapter: Checkpoint | None = None
    deltas: dict[str, _Delta] = field(default_factory=dict)
    replaced: dict[str, str] = field(default_factory=dict)  # base name → adapter tensor
    fan_in_fan_out: bool = False

    def read(self, name: str, index: int | None = None) -> torch.Tensor:
        if index is not None:  # one matrix of a stack: read alone unless the adapter changes it
            if name in self.replaced or name in self.deltas:
                return self.read(name)[index].clone()
            return super().read(name, index)
        assert self.adapter is not None
        if name in self.replaced:
            weight = self.adapter.read(self.replaced[name])
        else:
            weight = super().read(name)
        delta = self.deltas.get(name)
        if delta is None:
            return weight
        a, b = self.adapter.read(delta.a), self.adapter.read(delta.b)
        update = (b.flatten(1) @ a.flatten(1)) * delta.scale
        if delta.embedding or self.fan_in_fan_out:
            update = update.T
        return weight.add_(update.reshape(weight.shape))

    def merge_plan(self) -> dict[str, Any]:
        """How the adapter is merged (targets, factors, scales): part of the result cache key."""
        return {
            "deltas": {name: vars(delta) for name, delta in sorted(self.deltas.items())},
            "replaced": dict(sorted(self.replaced.items())),
            "fan_in_fan_out": self.fan_in_fan_out,
        }

    def close(self) -> None:
        super().close()
        if self.adapter is not None:
            self.adapter.close()

    def fingerprint(self, digest: Callable[[Path], str] | None = None) -> dict[str, str]:
        assert self.adapter is not None
        own = {f"adapter/{k}": v for k, v in self.adapter.fingerprint(digest).items()}
        return {**super().fingerprint(digest), **own}


def read_adapter(path: Path, base: str | os.PathLike[str] | None = None) -> AdapterSettings:
    """adapter_config.json of the adapter directory ``path``, validated, with the base to merge
    over: ``base`` when given, else the config's ``base_model_name_or_path`` (any SOURCE form;
    :func:`dynaudit.sources.open_checkpoint` opens it)."""
    config = read_json(path / ADAPTER_CONFIG)
    if not isinstance(config, dict):
        raise AdapterRefused(f"{path / ADAPTER_CONFIG}: not a JSON object", path=str(path))
    _check_supported(config, path)
    settings = _settings(config, path)
    base_ref = os.fspath(base) if base is not None else settings.base
    if not base_ref:
        raise AdapterRefused(
            f"{path}: adapter_config.json names no base model; pass --base", path=str(path)
        )
    return replace(settings, base=base_ref)


def merge_adapter(
    path: Path, settings: AdapterSettings, adapter: Checkpoint, base: Checkpoint
) -> AdapterCheckpoint:
    """The opened ``base`` with the opened ``adapter`` (the weights of the adapter directory
    ``path``) merged in as its layers are read; every factor is checked against the base first."""
    merged = AdapterCheckpoint(
        root=base.root,
        files=base.files,
        tensors=base.tensors,
        config=base.config,
        metadata=base.metadata,
        selection=base.selection,
        vouched=base.vouched,
        adapter=adapter,
        fan_in_fan_out=settings.fan_in_fan_out,
    )
    _plan_merge(merged, adapter, settings, path)
    return merged


@contextmanager
def opening(path: Path) -> Iterator[None]:
    """Mark ``path`` as being opened while its base is: an adapter met again on the way down
    is a cycle (its base is itself, or A → B → A), refused naming every step."""
    here = Path(os.path.realpath(path))
    chain = _OPENING.get()
    if here in chain:
        steps = " → ".join(str(p) for p in (*chain[chain.index(here) :], here))
        raise AdapterRefused(
            f"{path}: the adapter's base model leads back to itself ({steps}); point "
            "base_model_name_or_path (or --base) at the base checkpoint",
            path=str(path),
        )
    if len(chain) >= _MAX_CHAIN:
        raise AdapterRefused(
            f"{path}: more than {_MAX_CHAIN} adapters stacked over one another; merge some "
            "with merge_and_unload() first",
            path=str(path),
        )
    token = _OPENING.set((*chain, here))
    try:
        yield
    finally:
        _OPENING.reset(token)


def _check_supported(config: dict[str, Any], path: Path) -> None:
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise AdapterRefused(
            f"{path}: PEFT type {peft_type!r} is not merged by dynaudit (LoRA only); merge it "
            "with merge_and_unload() and audit the merged checkpoint",
            path=str(path),
        )
    for key, what in _UNSUPPORTED.items():
        if config.get(key):
            raise AdapterRefused(
                f"{path}: {what} ({key}), which dynaudit does not merge exactly; merge it "
                "with merge_and_unload() and audit the merged checkpoint",
                path=str(path),
            )


def _settings(config: dict[str, Any], path: Path) -> AdapterSettings:
    """The keys the merge uses, each checked for the type PEFT gives it."""
    where = f"{path / ADAPTER_CONFIG}"

    def refuse(key: str, value: object, want: str) -> AdapterRefused:
        return AdapterRefused(f"{where}: {key} is {_shown(value)}; {want}", path=str(path))

    def rank_of(key: str, value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise refuse(key, value, "the LoRA rank must be a positive integer")
        return value

    def alpha_of(key: str, value: object) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise refuse(key, value, "lora_alpha must be a number")
        if not math.isfinite(value):
            raise refuse(key, value, "lora_alpha must be a finite number")
        return float(value)

    def flag(key: str) -> bool:
        value = config.get(key)
        if value is not None and not isinstance(value, bool):
            raise refuse(key, value, "it must be true or false")
        return bool(value)

    def patterns(
        key: str, parse: Callable[[str, object], Any]
    ) -> list[tuple[re.Pattern[str], Any]]:
        table = config.get(key)
        if table is None:
            return []
        if not isinstance(table, dict):
            raise refuse(key, table, "it must map module name patterns to values")
        out = []
        for pattern, value in table.items():
            try:
                re.compile(pattern)  # alone first: the error's position is within the key
                compiled = re.compile(rf"(.*\.)?({pattern})$")
            except (re.error, RecursionError, OverflowError) as exc:
                raise refuse(f"{key} key", pattern, f"not a regular expression ({exc})") from exc
            out.append((compiled, parse(f"{key}[{pattern!r}]", value)))
        return out

    base = config.get("base_model_name_or_path")
    if base is not None and not isinstance(base, str):
        raise refuse(
            "base_model_name_or_path",
            base,
            "it must be one model (a string); pass --base to choose",
        )
    return AdapterSettings(
        rank=rank_of("r", config.get("r", 8)),
        alpha=alpha_of("lora_alpha", config.get("lora_alpha", 8)),
        rank_pattern=patterns("rank_pattern", rank_of),
        alpha_pattern=patterns("alpha_pattern", alpha_of),
        rslora=flag("use_rslora"),
        fan_in_fan_out=flag("fan_in_fan_out"),
        base=base,
    )


def _shown(value: object) -> str:
    """``value`` as adapter_config.json shows it, shortened for a one-line message."""
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _pattern_value(patterns: list[tuple[re.Pattern[str], Any]], module: str, default: Any) -> Any:
    """PEFT's matching for rank_pattern/alpha_pattern: the first key ``k`` with
    ``re.match(rf"(.*\\.)?({k})$", module)``."""
    for pattern, value in patterns:
        if pattern.match(module):
            return value
    return default


def _plan_merge(
    merged: AdapterCheckpoint, adapter: Checkpoint, settings: AdapterSettings, path: Path
) -> None:
    pairs: dict[str, dict[str, str]] = {}
    for name in adapter.tensors:
        if not name.startswith(_PREFIX):
            raise AdapterRefused(f"{path}: unexpected adapter tensor {name!r}", path=str(path))
        match = _LORA_KEY.match(name)
        if match:
            part = match["kind"] or match["emb"]
            pairs.setdefault(match["module"], {})[part[-1]] = name
            continue
        # A full tensor: modules_to_save, or the base layer saved beside its LoRA.
        target = name[len(_PREFIX) :].replace(".base_layer.", ".")
        if target not in merged.tensors:
            raise AdapterRefused(
                f"{path}: adapter tensor {name!r} replaces {target!r}, which the base lacks",
                path=str(path),
            )
        if adapter.tensors[name].shape != merged.tensors[target].shape:
            raise AdapterRefused(
                f"{path}: {name!r} has shape {list(adapter.tensors[name].shape)}, the base's "
                f"{target!r} {list(merged.tensors[target].shape)} (resized vocabulary?)",
                path=str(path),
            )
        merged.replaced[target] = name
    for module_key, parts in pairs.items():
        if set(parts) != {"A", "B"}:
            raise AdapterRefused(f"{path}: {module_key} lacks lora_A or lora_B", path=str(path))
        module = module_key[len(_PREFIX) :]
        target = f"{module}.weight"
        if target not in merged.tensors:
            raise AdapterRefused(
                f"{path}: the adapter targets {module!r}, which the base checkpoint lacks "
                "(wrong base model?)",
                path=str(path),
            )
        rank = int(_pattern_value(settings.rank_pattern, module, settings.rank))
        alpha = float(_pattern_value(settings.alpha_pattern, module, settings.alpha))
        embedding = "lora_embedding_A" in parts["A"]
        _check_factors(merged, adapter, target, parts, rank, path)
        scale = alpha / math.sqrt(rank) if settings.rslora else alpha / rank
        merged.deltas[target] = _Delta(parts["A"], parts["B"], scale, embedding)
        _check_shapes(merged, adapter, target, parts, embedding, path)


def _check_factors(
    merged: AdapterCheckpoint,
    adapter: Checkpoint,
    target: str,
    parts: dict[str, str],
    rank: int,
    path: Path,
) -> None:
    """A (r × in…) and B (out × r, then 1s) have the base weight's number of dimensions, no
    empty one, and the rank the config gives."""
    base = merged.tensors[target].shape
    a, b = adapter.tensors[parts["A"]].shape, adapter.tensors[parts["B"]].shape
    for factor, shape in ((parts["A"], a), (parts["B"], b)):
        if len(shape) != len(base) or 0 in shape:
            raise AdapterRefused(
                f"{path}: {factor!r} has shape {list(shape)}; a LoRA factor of the "
                f"{len(base)}-D weight {target!r} {list(base)} is {len(base)}-D with no empty "
                "dimension",
                path=str(path),
            )
    if a[0] != rank or b[1] != rank or any(size != 1 for size in b[2:]):
        raise AdapterRefused(
            f"{path}: {target!r} has LoRA factors A {list(a)} and B {list(b)}; its config "
            f"says rank {rank} (A is rank × inputs, B outputs × rank)",
            path=str(path),
        )


def _check_shapes(
    merged: AdapterCheckpoint,
    adapter: Checkpoint,
    target: str,
    parts: dict[str, str],
    embedding: bool,
    path: Path,
) -> None:
    base = merged.tensors[target].shape
    a, b = adapter.tensors[parts["A"]].shape, adapter.tensors[parts["B"]].shape
    rows, cols = b[0], math.prod(a[1:])
    if embedding or merged.fan_in_fan_out:
        rows, cols = cols, rows
    if rows * cols != math.prod(base) or base[0] != rows:
        raise AdapterRefused(
            f"{path}: LoRA update for {target!r} is {rows}×{cols}, the base weight "
            f"{list(base)} (wrong base model?)",
            path=str(path),
        )
