"""The generic family: every 2-D (Linear) and 4-D (Conv2d) weight, in natural name order.

It knows nothing about the architecture, so depth is simply the position in that order (a
heuristic the report states) and the type is the role the tensor's name gives it.

Recurrent layers are the exception, because PyTorch names them the same way everywhere:
``nn.RNN``/``nn.LSTM``/``nn.GRU`` store ``weight_ih_l{k}`` (input to gates) and
``weight_hh_l{k}`` (hidden state to gates), ``_reverse`` for the second direction, with the
gates stacked along the rows (LSTM i, f, g, o; GRU r, z, n). Each gate's rows are its own
matrix, so each becomes a layer. The gate count comes from the layer's own structure:
``weight_hh`` is ``(gates·hidden, hidden)`` (``(gates·hidden, proj)`` with ``weight_hr``
``(proj, hidden)``), so ``gates = rows / hidden`` — 4, 3 or 1 — and ``weight_ih`` must have the
same rows. A model with recurrent layers (a CRNN: convolutions, recurrent layers, a classifier)
is ordered by what each module holds rather than alphabetically (:func:`_crnn_order`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from dynaudit.families import Family, IndexMap, Layer, LayerPlan
from dynaudit.families.build import PlanBuilder, chain_index
from dynaudit.families.naming import DEPTHWISE, looks_depthwise, role, skip_reason
from dynaudit.tensors import Checkpoint, natural_key

__all__ = ["GATES", "GenericFamily", "role"]

# gates per hidden unit → (module kind, gate letters in PyTorch's row order).
GATES = {4: ("lstm", "ifgo"), 3: ("gru", "rzn"), 1: ("rnn", "")}
_LETTERS = dict(GATES.values())
_RECURRENT = re.compile(
    r"(?P<module>(?:.+\.)?)(?P<part>weight_ih|weight_hh|weight_hr|bias_ih|bias_hh|bias_hr)"
    r"(?:_l(?P<layer>\d+))?(?P<reverse>_reverse)?"
)
# Stages of the CRNN order: a module holding convolutions first, then one holding recurrent
# layers, then one holding only linear layers (the classifier).
_CONV, _RECURRENT_STAGE, _LINEAR = 0, 1, 2


@dataclass
class _Direction:
    """One direction of one recurrent layer: its weights and, when the gates could be read,
    how they split."""

    ih: str
    hh: str
    hr: str | None
    reverse: bool
    kind: str = ""  # lstm, gru, rnn; "" when audited whole
    hidden: int = 0
    why_whole: str = ""


@dataclass
class _Recurrent:
    """Layer ``index`` of a recurrent module (``rnn.`` for ``rnn.weight_ih_l0``): forward
    direction first, then the reverse one."""

    module: str
    index: int
    directions: list[_Direction] = field(default_factory=list)


@dataclass
class _Entry:
    """One step of the depth order: a tensor (conv or linear) or a recurrent layer."""

    path: tuple[str, ...]
    stage: int
    tensor: str | None = None
    recurrent: _Recurrent | None = None


# The output of the previous step, as the next one reads it: per part (a direction of a
# recurrent layer, concatenated), the layers producing it and its width.
_Output = list[tuple[list[str], int]]


class GenericFamily(Family):
    name = "generic"
    description = "any checkpoint: every Linear and Conv2d weight, depth = position by name"

    def detect(self, checkpoint: Checkpoint) -> float:
        return 0.01

    def plan(self, checkpoint: Checkpoint) -> LayerPlan:
        build = PlanBuilder(checkpoint, "generic")
        recurrent, taken = _recurrent_layers(checkpoint)
        entries = _entries(build, checkpoint, recurrent, taken)
        if recurrent:
            entries = _crnn_order(entries)
        previous: _Output = []
        for depth, entry in enumerate(entries):
            if entry.recurrent is not None:
                previous = _add_recurrent(build, entry.recurrent, depth, previous)
            else:
                assert entry.tensor is not None
                previous = _add_tensor(build, entry.tensor, depth, previous)
        build.note("generic family: the layer graph chains layers whose widths fit (a guess)")
        for layer in recurrent:
            _note_recurrent(build, layer)
        if not recurrent:
            return build.build(
                depth_note="generic family: depth is the layer's position in natural name order"
            )
        return build.build(
            depth_note="generic family: depth is the position in name order, with modules "
            "holding convolutions first, then recurrent layers, then linear layers (a CRNN's "
            "order); a recurrent layer's gates and both its directions share one depth",
            widths=_widths(checkpoint, entries),
        )


def _entries(
    build: PlanBuilder, checkpoint: Checkpoint, recurrent: list[_Recurrent], taken: set[str]
) -> list[_Entry]:
    """The steps in natural name order: every usable conv or linear weight (the others skipped
    with their reason), and each recurrent layer where its first weight falls."""
    entries: list[_Entry] = []
    conv_channels: set[int] = set()
    first = {d.ih: layer for layer in recurrent for d in layer.directions[:1]}
    for name in checkpoint.names():
        if name in first:
            layer = first[name]
            path = (*layer.module.split(".")[:-1], f"weight_ih_l{layer.index}")
            entries.append(_Entry(path, _RECURRENT_STAGE, recurrent=layer))
            continue
        if name in taken:
            continue
        info = checkpoint.tensors[name]
        reason = skip_reason(info)
        if reason == "embedding table" and _has_bias(checkpoint, name):
            reason = None  # a Linear named "embedding" (nn.Embedding has no bias)
        recurrent_part = _RECURRENT.fullmatch(name)
        if recurrent_part and recurrent_part["part"].startswith("bias"):
            reason = "bias"  # bias_ih_l0 does not end with "bias"
        if reason is None and len(info.shape) == 4:
            if looks_depthwise(info.shape, conv_channels):
                reason = DEPTHWISE
            conv_channels.add(info.shape[0])
        if reason is not None:
            build.skip(name, reason)
            continue
        stage = _CONV if len(info.shape) == 4 else _LINEAR
        entries.append(_Entry(tuple(name.split(".")), stage, tensor=name))
    return entries


def _has_bias(checkpoint: Checkpoint, name: str) -> bool:
    """A ``….bias`` beside weight ``name`` with one entry per row."""
    if not name.endswith(".weight"):
        return False
    bias = checkpoint.tensors.get(name.removesuffix("weight") + "bias")
    return bias is not None and bias.shape == checkpoint.tensors[name].shape[:1]


def _crnn_order(entries: Sequence[_Entry]) -> list[_Entry]:
    """The entries ordered down the module tree: at every level, sibling modules holding a
    convolution come first, then those holding a recurrent layer, then the rest; siblings of
    one stage keep natural name order. A CRNN's ``cnn.*`` then ``rnn.*`` then ``fc``, even
    when names sort ``fc`` before ``rnn``; a BiLSTM block's LSTM before its own output Linear;
    stacked recurrent layers by their index (``l0`` before ``l1``)."""
    stage: dict[tuple[str, ...], int] = {}
    for entry in entries:
        for end in range(1, len(entry.path) + 1):
            prefix = entry.path[:end]
            stage[prefix] = min(stage.get(prefix, entry.stage), entry.stage)

    def key(entry: _Entry) -> tuple[tuple[int, tuple[tuple[int, int | str], ...]], ...]:
        return tuple(
            (stage[entry.path[: i + 1]], natural_key(part)) for i, part in enumerate(entry.path)
        )

    return sorted(entries, key=key)


def _recurrent_layers(checkpoint: Checkpoint) -> tuple[list[_Recurrent], set[str]]:
    """Every recurrent layer (PyTorch's names) with both weights as float matrices, and the
    weight names they take; biases are left to be skipped."""
    found: dict[tuple[str, int, bool], dict[str, str]] = {}
    for name in checkpoint.names():
        match = _RECURRENT.fullmatch(name)
        if match and match["part"].startswith("weight"):
            key = (match["module"], int(match["layer"] or 0), bool(match["reverse"]))
            found.setdefault(key, {})[match["part"]] = name
    layers: dict[tuple[str, int], _Recurrent] = {}
    taken: set[str] = set()
    for (module, index, reverse), parts in sorted(found.items(), key=lambda kv: kv[0][2]):
        ih, hh = parts.get("weight_ih"), parts.get("weight_hh")
        if ih is None or hh is None or not all(_matrix(checkpoint, n) for n in (ih, hh)):
            continue  # not a recurrent layer PyTorch wrote: the tensors go the ordinary way
        hr = parts.get("weight_hr")
        hr = hr if hr is not None and _matrix(checkpoint, hr) else None
        direction = _Direction(ih, hh, hr, reverse)
        _read_gates(checkpoint, direction)
        layer = layers.setdefault((module, index), _Recurrent(module, index))
        layer.directions.append(direction)
        taken.update(n for n in (ih, hh, hr) if n is not None)
    return sorted(layers.values(), key=lambda x: (natural_key(x.module), x.index)), taken


def _matrix(checkpoint: Checkpoint, name: str) -> bool:
    info = checkpoint.tensors[name]
    return info.is_float and len(info.shape) == 2 and skip_reason(info) is None


def _read_gates(checkpoint: Checkpoint, direction: _Direction) -> None:
    """The gate count and hidden size from the weights' shapes: ``weight_hh`` is
    ``(gates·hidden, hidden)``, or ``(gates·hidden, proj)`` beside ``weight_hr`` ``(proj,
    hidden)``; ``weight_ih`` has the same rows. Anything else is audited whole, saying why."""
    ih = checkpoint.tensors[direction.ih].shape
    hh = checkpoint.tensors[direction.hh].shape
    if direction.hr is not None:
        hr = checkpoint.tensors[direction.hr].shape
        hidden = hr[1]
        if hr[0] != hh[1]:
            direction.why_whole = f"weight_hr {list(hr)} does not project onto weight_hh's {hh[1]}"
            return
    else:
        hidden = hh[1]
    gates = hh[0] // hidden
    if hh[0] % hidden or gates not in GATES:
        direction.why_whole = (
            f"weight_hh {list(hh)}: {hh[0]} rows are not 4, 3 or 1 gates of {hidden} units"
        )
    elif ih[0] != hh[0]:
        direction.why_whole = f"weight_ih has {ih[0]} rows, weight_hh {hh[0]}"
    else:
        direction.kind, direction.hidden = GATES[gates][0], hidden


def _add_tensor(build: PlanBuilder, name: str, depth: int, previous: _Output) -> _Output:
    """A conv or linear weight as a layer, fed by the previous step when the widths fit."""
    info = build.checkpoint.tensors[name]
    if len(info.shape) == 4:
        layer = Layer(name, "conv", depth, "conv")
    else:
        layer = Layer(name, role(name, "linear"), depth, "linear")
    _fed(build, layer, previous)
    return [([name], build.outputs(name))]


def _fed(build: PlanBuilder, layer: Layer, previous: _Output) -> None:
    """Plan ``layer`` fed by ``previous`` when their widths fit, else as reading the input. One
    producer (or several of one width, a recurrent direction's gates) is read through
    :func:`chain_index`; the directions of a bidirectional layer are read concatenated, input
    ``c`` from channel ``c mod width`` of each: the map is exact on each direction's own half
    (an index map has no offset to say that the other half reads the other direction)."""
    index: IndexMap | None = None
    if len(previous) == 1:
        index = chain_index(previous[0][1], layer, build.shape(layer))
    elif previous:
        width = previous[0][1]
        _, _, inputs = build.shape(layer)
        concat = all(w == width for _, w in previous) and inputs == width * len(previous)
        if layer.kind == "linear" and concat:
            index = IndexMap(head_dim=width, group=len(previous))
    if index is None:
        build.add(layer)
        build.reads_input(layer.name)
    else:
        build.add(layer, [src for producers, _ in previous for src in producers], index)


def _add_recurrent(
    build: PlanBuilder, recurrent: _Recurrent, depth: int, previous: _Output
) -> _Output:
    """Each direction's gate matrices (or whole weights) at ``depth``. The input matrices read
    the previous step; the hidden ones read the hidden state, drawn as fed by the projection
    when there is one, else by the direction's input matrices (the recurrence itself is a
    cycle, which a graph of depths cannot hold). What follows reads every gate matrix (each
    hidden unit is computed from its own row of every gate), or the projection."""
    output: _Output = []
    for direction in recurrent.directions:
        if not direction.kind:
            _fed(build, Layer(direction.ih, "recurrent.input", depth), previous)
            _fed(build, Layer(direction.hh, "recurrent.hidden", depth), [])
            if direction.hr is not None:
                _fed(build, Layer(direction.hr, "recurrent.projection", depth), [])
            continue
        inputs = _gate_layers(direction, direction.ih, "input", depth)
        hidden = _gate_layers(direction, direction.hh, "hidden", depth)
        for layer in inputs:
            _fed(build, layer, previous)
        state: _Output = [([x.name for x in inputs], direction.hidden)]
        if direction.hr is not None:
            projection = Layer(direction.hr, f"{direction.kind}.projection", depth)
            _fed(build, projection, state)
            state = [([projection.name], build.outputs(projection.name))]
        for layer in hidden:
            _fed(build, layer, state)
        if direction.hr is None:
            state = [([x.name for x in (*inputs, *hidden)], direction.hidden)]
        output.extend(state)
    return output


def _gate_layers(direction: _Direction, tensor: str, part: str, depth: int) -> list[Layer]:
    """``tensor``'s gates as layers (``rnn.weight_ih_l0[f]``, type ``lstm.input.f``), or the
    whole tensor for a plain RNN, whose one gate is the matrix itself."""
    kind, hidden = direction.kind, direction.hidden
    letters = _LETTERS[kind]
    if not letters:
        return [Layer(tensor, f"{kind}.{part}", depth)]
    return [
        Layer(
            f"{tensor}[{gate}]",
            f"{kind}.{part}.{gate}",
            depth,
            tensor=tensor,
            rows=((i * hidden, (i + 1) * hidden),),
        )
        for i, gate in enumerate(letters)
    ]


def _note_recurrent(build: PlanBuilder, recurrent: _Recurrent) -> None:
    """The report's line on a recurrent layer: split per gate, with the gate count and where it
    was read, or audited whole and why."""
    split = [d for d in recurrent.directions if d.kind]
    if split:
        first = split[0]
        hh = list(build.checkpoint.tensors[first.hh].shape)
        letters = _LETTERS[first.kind]
        how = f"split per gate ({', '.join(letters)})" if letters else "one gate each, whole"
        reads = "proj" if first.hr else "hidden"
        build.note(
            f"generic family: {_label(recurrent, split)}: {first.kind.upper()} weight_ih and "
            f"weight_hh {how}; {_gates(hh[0] // first.hidden)} of {first.hidden} units, read "
            f"from weight_hh {hh} = (gates·hidden, {reads})"
        )
    for direction in recurrent.directions:
        if not direction.kind:
            build.note(
                f"generic family: {_label(recurrent, [direction])}: recurrent weights audited "
                f"whole ({direction.why_whole})"
            )


def _label(recurrent: _Recurrent, directions: Sequence[_Direction]) -> str:
    """``rnn.*_l0`` or ``rnn.*_l0{,_reverse}``: the weights of these directions."""
    base = f"{recurrent.module}*_l{recurrent.index}"
    if len(directions) == 2:
        return base + "{,_reverse}"
    return base + ("_reverse" if directions[0].reverse else "")


def _widths(checkpoint: Checkpoint, entries: Iterable[_Entry]) -> list[int]:
    """The main path's widths in the CRNN order: the first step's input, then each step's
    outputs — a recurrent layer's are its directions' hidden states side by side (``weight_hh``
    has one column per unit of the state it reads, the projection's when there is one)."""
    widths: list[int] = []
    for entry in entries:
        if entry.recurrent is not None:
            directions = entry.recurrent.directions
            if not widths:
                widths.append(checkpoint.tensors[directions[0].ih].shape[1])
            widths.append(sum(checkpoint.tensors[d.hh].shape[1] for d in directions))
            continue
        assert entry.tensor is not None
        shape = checkpoint.tensors[entry.tensor].shape
        if not widths:
            widths.append(shape[1])
        widths.append(shape[0])
    return widths


def _gates(count: int) -> str:
    return f"{count} gate{'s' * (count != 1)}"
