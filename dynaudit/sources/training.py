"""Training checkpoints: the model weights among everything else a training loop saves.

``torch.save({'model_state_dict': ..., 'optimizer_state_dict': ..., 'epoch': 5})``, a PyTorch
Lightning ``.ckpt`` or a model saved beside its exponential moving average hold more than the
model. A pickle keeps them as nested mappings (:mod:`dynaudit.sources.pickles` converts the one
chosen here); a safetensors file can only hold them flattened, one tensor per dotted name —
``model_state_dict.conv1.weight`` beside ``optimizer_state_dict.state.0.exp_avg``.
:func:`model_weights` recognises such a file from its names alone and keeps only the model
weights, under their own names: the headers are renamed, no tensor data is read or copied.

Both formats choose the key by one rule (:data:`STATE_DICT_KEYS`, or ``--state-dict-key``), and
the report says which key was used in the same words (:func:`weights_note`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import replace

from dynaudit.errors import StateDictKeyNotFound, listed
from dynaudit.tensors import Checkpoint, TensorInfo

__all__ = [
    "LIGHTNING_PREFIX",
    "OPTIMIZER_KEYS",
    "STATE_DICT_KEYS",
    "lightning_prefix",
    "model_weights",
    "weights_note",
]

# Where training loops keep the model's weights, in the order they are tried: the raw model
# before its exponential moving average (pick ``ema`` with --state-dict-key).
STATE_DICT_KEYS = ("model_state_dict", "state_dict", "model", "module", "ema", "model_ema")
LIGHTNING_PREFIX = "model."  # a LightningModule's submodule, on every name of its state_dict
# Keys that name no module a model would have: they say the file is a training checkpoint.
_UNAMBIGUOUS = ("model_state_dict", "state_dict")  # nn.Module.state_dict is a method, not a child
# Keys a training loop keeps optimizer state under (torch's tutorial, Lightning, common loops).
OPTIMIZER_KEYS = frozenset(
    {
        "optimizer_state_dict",
        "optimizer",
        "optimizers",
        "optimizer_states",
        "optim",
        "optim_state",
        "opt_state",
        "lr_scheduler",
        "lr_schedulers",
        "scheduler_state_dict",
        "scaler_state_dict",
    }
)
# A flattened ``torch.optim.Optimizer.state_dict()`` under any key: ``state.<param>.<buffer>``
# (``0.state.…`` in a list of optimizers), with the buffers torch's optimizers keep.
_OPTIMIZER_STATE = re.compile(
    r"(?:\d+\.)?state\.\d+\.(?:exp_avg|exp_avg_sq|max_exp_avg_sq|momentum_buffer|step|sum"
    r"|square_avg|grad_avg|acc_delta|exp_inf|eta|mu|ax|prev|step_size)$"
)


def weights_note(key: str, prefix_removed: str, others: Iterable[str]) -> str:
    """The report's line on a training checkpoint: the key whose weights were audited, a
    Lightning prefix removed from their names, and the keys not audited."""
    note = f"the model weights under {key!r} of a training checkpoint"
    if prefix_removed:
        note += f" (PyTorch Lightning: prefix {prefix_removed!r} removed)"
    rest = sorted(others)
    return note + (f"; not audited: {listed(rest, 6)}" if rest else "")


def lightning_prefix(key: str, names: Iterable[str]) -> str:
    """``model.`` when ``key`` is Lightning's ``state_dict`` and every name under it has the
    prefix a ``LightningModule`` puts on its submodule's weights; else nothing to remove."""
    names = list(names)
    if key == "state_dict" and names and all(n.startswith(LIGHTNING_PREFIX) for n in names):
        return LIGHTNING_PREFIX
    return ""


def model_weights(checkpoint: Checkpoint, key: str | None = None) -> Checkpoint:
    """``checkpoint`` (safetensors), reduced to its model weights when its tensor names are a
    flattened training checkpoint; the weights keep their names within the model
    (``model_state_dict.fc.weight`` → ``fc.weight``) and ``weights_note`` says which key.

    With ``key`` (``--state-dict-key``) the weights under ``key.`` are audited; a key no name
    starts with is exit 3 listing the file's top-level keys when the file is a training
    checkpoint, and a note when it is a model (read whole). Without, the file is a training
    checkpoint only when its names say so beyond doubt (:func:`_training_evidence`): a LLaMA's
    ``model.layers.…`` beside ``lm_head.weight`` is a model, and is left as it is."""
    under = _by_key(checkpoint.tensors)
    where = str(checkpoint.root)
    if key is None:
        evidence = _training_evidence(under)
        if evidence is None:
            return checkpoint
        key = next((k for k in STATE_DICT_KEYS if under.get(k)), None)
        if key is None:
            raise StateDictKeyNotFound(
                f"{where}: a training checkpoint ({evidence}) with no model weights under "
                f"{', '.join(STATE_DICT_KEYS)} (its top-level names: {listed(sorted(under), 8)}); "
                "--state-dict-key KEY names the prefix that holds them",
                path=where,
            )
    elif not under.get(key):
        if _training_evidence(under) is None:
            # A model, read whole and saying so: ``check`` opens its baseline with the flag
            # meant for the candidate, and a safetensors model baseline has no key to pick.
            checkpoint.weights_note = (
                f"--state-dict-key {key} does not apply: no tensor name starts with "
                f"{key + '.'!r} and this is not a training checkpoint; audited whole"
            )
            return checkpoint
        raise StateDictKeyNotFound(
            f"{where}: --state-dict-key {key}: no tensor name starts with {key + '.'!r}; the "
            f"checkpoint's keys: {listed(sorted(under), 12)}",
            path=where,
        )
    return _keep(checkpoint, key, under)


def _by_key(tensors: Mapping[str, TensorInfo]) -> dict[str, list[str]]:
    """The tensor names under each top-level key (the part before the first dot), without the
    key; a name with no dot is a key holding one tensor and no names (``epoch``)."""
    under: dict[str, list[str]] = {}
    for name in tensors:
        top, _, rest = name.partition(".")
        names = under.setdefault(top, [])
        if rest:
            names.append(rest)
    return under


def _training_evidence(under: Mapping[str, list[str]]) -> str | None:
    """Why these names are a flattened training checkpoint, or None when they may be a model's:
    optimizer state (a key of :data:`OPTIMIZER_KEYS`, or names shaped like a flattened
    optimizer state dict), ``model_state_dict.`` or ``state_dict.`` (no module is named so),
    or two of the other keys holding the same names (a model and its average)."""
    for top, names in sorted(under.items()):
        if names and (top in OPTIMIZER_KEYS or all(_OPTIMIZER_STATE.match(n) for n in names)):
            return f"optimizer state under {top!r}"
    for top in _UNAMBIGUOUS:
        if under.get(top):
            return f"tensor names under {top!r}"
    held = [k for k in STATE_DICT_KEYS if k not in _UNAMBIGUOUS and under.get(k)]
    for i, first in enumerate(held):
        for second in held[i + 1 :]:
            if set(under[first]) == set(under[second]):
                return f"the same weights under {first!r} and {second!r}"
    return None


def _keep(checkpoint: Checkpoint, key: str, under: Mapping[str, list[str]]) -> Checkpoint:
    """``checkpoint`` holding only the tensors under ``key``, renamed without ``key.`` (and a
    Lightning prefix), with the report's note."""
    removed = lightning_prefix(key, under[key])
    strip = f"{key}.{removed}"
    kept: dict[str, TensorInfo] = {}
    for name, info in checkpoint.tensors.items():
        if name.startswith(strip) and len(name) > len(strip):
            kept[name[len(strip) :]] = replace(info, name=name[len(strip) :])
    checkpoint.tensors = kept
    checkpoint.weights_note = weights_note(key, removed, (k for k in under if k != key))
    return checkpoint
