"""Composite activations and gates: the part of the one trace that follows element-wise sub-graphs from a layer.

:class:`Composites` is owned by the tracer of :mod:`lightning_bn.tracing.trace`, which calls it at fixed points and
otherwise does not look inside; everything about composites and gates is here.

*What is tracked.* A *root* (:class:`_Root`) is a tensor element-wise sub-graphs start from: a layer's looked-through
output at its first element-wise use (a call, or an activation module's input), or that after a bias or scale by
per-channel constants (a new root of the same *lineage*). Every tensor computed element-wise from one root, its other
operands Python numbers or constants (no tags, nothing upstream; a non-parameter constant of at most
:data:`_CONSTANT_LIMIT` elements), carries a record (:class:`_Derived`, held by a weak reference to the tensor):

- a replayable :class:`_Node` (the calls from the root; none where a constant varies along the tensor, then no single
  function of one element computes it),
- its values at the root's :data:`_SAMPLES` sampled positions (drawn once per shape and device with a fixed seed, so
  the samples of one sub-graph pair up; read by ``index_select``, no activation-sized copy),
- whether a nonlinearity lies on the way (its output is an activation's output: ``_Meta.act_of``), and whether a
  *merge* of two operands from the root with one nonlinear does (a composite: ``h * torch.sigmoid(h)``),
- the activation calls made inside it: their sites, their pending calls, the layers they resolved first.

*When recognition runs.* A composite is complete when it is *consumed*, i.e. used other than element-wise: it enters a
module that is no container (a layer, a norm, an activation module, ...), a call that is no element-wise step of it
(a product with another layer's output, a reduction, a matmul), or it is the model output. Then, once per lineage, the
sub-graph is one function: replayed on :func:`~lightning_bn.tracing.recognize`'s grid where one function of one
element computes it and the replay reproduces the samples, else judged from the samples
(:func:`~lightning_bn.tracing.recognize.recognize_samples`); a composite nothing can judge reads as no activation,
never as its inner call.

*What replaces what.* The function becomes the activation of the root's layers with ``how="composite"`` (over the
resolution by the inner calls, not over an activation found earlier outside the composite). The inner calls' sites
are dropped and their pending calls marked ``"dropped"`` (an activation *module* inside keeps its own site). One site
for the whole function takes their place: hook ``"input"`` on the root's source module; else hook ``"output"`` on the
innermost module whose output the composite is (kinds readable from their output); else a pending call, reported
unwatchable. It is named ``<layer>.<kind>``, ``<layer>.composite`` for a kind by behaviour.

*Gates.* A product (``mul`` that is no element-wise step) of an activation's output with a tensor not computed
element-wise from that activation's layer makes the activation's layers gates (of two activation outputs: the
broadcast factor, squeeze-excite; else the factor with values in [0, 1], ``o * tanh(c)``); a factor of the product's
own shape that is a layer's looked-through output is ``gated_by`` the first gate layer (a broadcast gate gates no
element). ``F.glu`` / ``nn.GLU``: the layer gates itself, and the sigmoid of its second half is unwatchable.

*Call points* (all from the tracer, in the order of the forward pass):

- :meth:`Composites.call`: every traced torch call; an element-wise step or merge returns its record, any other call
  consumes its operands; products and ``glu`` are checked for gates.
- :meth:`Composites.inner_call` / :meth:`Composites.keep`: an activation call inside a sub-graph / any other step:
  the output carries the record.
- :meth:`Composites.enter_activation` / :meth:`Composites.leave_activation`: an activation module's input and output.
- :meth:`Composites.leave_container`: a container's output (the module a composite's output hook may use).
- :meth:`Composites.consume_inputs` / :meth:`Composites.consume`: the inputs of a module that is no container / the
  model output.
- :attr:`Composites.gates`, :attr:`Composites.gated_by`, :attr:`Composites.unwatchable`: read by the tracer's
  ``finish``; :meth:`Composites.clear` drops every record.

From the tracer it uses: ``opaque`` (its own torch calls are no step of the model), ``get`` (a tensor's ``_Meta``),
``found`` and ``resolve``, ``measure``, ``add_site`` / ``drop_site``, ``pend`` / ``settle`` (pending calls) and
``module_named``.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from lightning_bn.activations import Activation, get_activation
from lightning_bn.tracing.model_map import ActivationSite, Layout
from lightning_bn.tracing.recognize import Recognition, recognize, recognize_samples, tolerance
from lightning_bn.tracing.types import _AFFINE, _ELEMENTWISE, _IN_PLACE, _tensors

if TYPE_CHECKING:
    from lightning_bn.tracing.trace import _Meta, _Path, _Tracer

__all__ = ["Composites"]


#: values of a tensor sampled to follow element-wise sub-graphs (composites) from a layer's output
_SAMPLES = 4096
#: largest non-scalar constant (not a parameter) an element-wise step may hold for its replay
_CONSTANT_LIMIT = 1 << 16


@dataclass(eq=False)
class _Node:
    """One call of an element-wise sub-graph: ``func(*args, **kwargs)`` with each operand computed from the root
    replaced by its node (the root itself is :data:`_ROOT_NODE`); replayed on any input by :func:`_replay`."""

    func: Any
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    in_place: bool = False


_ROOT_NODE = _Node(None)


def _replay(node: _Node) -> Callable[[Tensor], Tensor]:
    """The element-wise function ``root -> node`` as a callable of one tensor (each value computed once; the first
    operand of an in-place call is copied first, so neither the input nor a shared value is written)."""

    def composite(x: Tensor) -> Tensor:
        memo: dict[int, Any] = {id(_ROOT_NODE): x}

        def value(n: _Node) -> Any:
            if id(n) not in memo:
                args, kwargs = tree_map(lambda a: value(a) if isinstance(a, _Node) else a, (n.args, n.kwargs))
                if n.in_place and args and isinstance(args[0], Tensor):
                    args = (args[0].clone(), *args[1:])
                memo[id(n)] = n.func(*args, **kwargs)
            return memo[id(n)]

        return value(node)

    return composite


@dataclass(eq=False)
class _Root:
    """A tensor element-wise sub-graphs start from: a layer's output through looked-through steps (its first
    element-wise use), or that after a bias or scale by per-channel constants (``base``: the tensor it came from)."""

    tags: dict[str, _Path]
    source: str | None
    layout: Layout | None
    shape: tuple[int, ...]
    index: tuple[Tensor, ...]  # the sampled positions (the same for every tensor of this shape)
    xs: Tensor  # the root's values there
    tensor: weakref.ref
    base: _Root | None = None
    done: bool = False  # a composite of this lineage was recognized
    version: int = 0  # the tensor's version counter when sampled (an in-place call changes its values)

    def values(self) -> Tensor | None:
        """The root tensor, while it lives with the values it was sampled with (what a hook on its source sees)."""
        t = self.tensor()
        return t if t is not None and t._version == self.version else None

    @property
    def lineage(self) -> _Root:
        return self.base or self


@dataclass(eq=False)
class _Derived:
    """A tensor computed element-wise from one root: how (``node``, ``None`` where no single function of one element
    replays it), its values at the root's sampled positions, whether a nonlinearity or a merge of two operands from
    the root with one nonlinear (a composite) lies on the way, and the activation calls made inside it (dropped when
    the composite is recognized)."""

    root: _Root
    node: _Node | None
    ys: Tensor
    nonlinear: bool = False
    composite: bool = False
    sites: tuple[str, ...] = ()
    pending: tuple[int, ...] = ()
    found: frozenset[str] = frozenset()
    module: tuple[nn.Module, str] | None = None  # the innermost module whose output it is


def _in_place(func: Any, args: tuple, kwargs: dict) -> bool:
    name = getattr(func, "__name__", "")
    flagged = kwargs.get("inplace") is True or any(a is True for a in args[1:])  # F.relu(x, inplace=True)
    return flagged or name in _IN_PLACE or (name.endswith("_") and not name.startswith("_"))


def _distinct(t: Tensor) -> int:
    """How many distinct elements ``t`` holds: an expanded view (``y.expand_as(x)``, stride 0) counts once along the
    broadcast dimensions."""
    return math.prod(n for n, step in zip(t.shape, t.stride()) if step != 0)


def _agrees(a: Tensor, b: Tensor) -> bool:
    """A replay's values against the sampled ones: the same non-finite positions, the rest within a few roundings."""
    tol = 4 * tolerance(b.dtype)
    a, b = a.detach().double(), b.detach().double()
    if a.shape != b.shape:
        return False
    finite = torch.isfinite(b)
    if not bool((torch.isfinite(a) == finite).all()):
        return False
    return bool(((a - b).abs()[finite] <= tol * (1 + b.abs()[finite])).all())


class Composites:
    """The composites and gates of one traced forward pass (see the module docstring); owned by the tracer."""

    def __init__(self, tracer: _Tracer) -> None:
        self.tracer = tracer
        self.derived: dict[int, tuple[weakref.ref, _Derived]] = {}  # tensors computed element-wise from a root
        self.sample_index: dict[tuple, tuple[Tensor, ...]] = {}  # (shape, device) -> sampled positions
        self.sample_offsets: dict[tuple, Tensor] = {}  # (shape, strides, device) -> their memory offsets
        self.module_found: dict[nn.Module, frozenset[str]] = {}  # activation module -> layers it resolved
        #: layers whose activation's output gates another tensor
        self.gates: set[str] = set()
        #: layer -> the gate layer its looked-through output is multiplied with
        self.gated_by: dict[str, str] = {}
        #: activations no hook sees that are no pending call (glu): (name, why)
        self.unwatchable: list[tuple[str, str]] = []

    # ---- the tracer's call points ----
    def call(self, func: Any, name: str, act: Activation | None, args: tuple, kwargs: dict,
             seen: list[tuple[_Meta, Tensor]], merged: _Meta, output: Any) -> _Derived | None:  # fmt: skip
        """A traced torch call: the record of its output when it is an element-wise step from one root (the tracer
        then calls :meth:`inner_call` or :meth:`keep`), else its operands are consumed; a product or ``glu`` may
        mark gates."""
        derived = None
        if act is not None or name in _ELEMENTWISE:  # (else no element-wise step: nothing to sample)
            tracer = self.tracer
            tracer.opaque += 1
            try:
                derived = self._derive(func, name, act, args, kwargs, seen, output)
            finally:
                tracer.opaque -= 1
        if derived is None:
            self.consume([t for _, t in seen])
            if name == "mul":
                main = output[0] if isinstance(output, (tuple, list)) and output else output
                self._note_gate(seen, main)
        if name == "glu":
            self._glu(merged, seen[0][1] if seen else None)
        return derived

    def inner_call(self, output: Tensor, derived: _Derived, site: str | None, index: int | None,
                   new: frozenset[str]) -> None:  # fmt: skip
        """An activation call inside a sub-graph: its site (or pending call) and the layers it resolved first
        (``new``) go with the record, to be dropped or replaced when the composite is recognized."""
        derived.sites += (site,) if site is not None else ()
        derived.pending += (index,) if index is not None else ()
        derived.found |= new
        self.keep(output, derived)

    def keep(self, t: Tensor, record: _Derived) -> None:
        """``t`` carries ``record`` while it lives."""
        key, table = id(t), self.derived

        def forget(ref: weakref.ref, key: int = key) -> None:  # the tensor is gone: so are its samples
            entry = table.get(key)
            if entry is not None and entry[0] is ref:
                del table[key]

        table[key] = (weakref.ref(t, forget), record)

    def enter_activation(self, module: nn.Module, tags: dict[str, _Path]) -> None:
        """Before an activation module resolves its input's layers: which of them it resolves first."""
        found = self.tracer.found
        self.module_found[module] = frozenset(p for p in tags if p not in found)

    def leave_activation(self, module: nn.Module, args: tuple, kwargs: dict, output: Any, activation: Activation,
                         merged: _Meta) -> tuple[str, ...]:  # fmt: skip
        """An activation module's output: the layers whose activation's output it is (the root's, when its input is
        a root or computed from one; the output then carries a record)."""
        tracer = self.tracer
        tracer.opaque += 1
        try:
            record = self._module_output(args, kwargs, output, activation, self.module_found.pop(module, frozenset()),
                                         merged)  # fmt: skip
        finally:
            tracer.opaque -= 1
        if record is None:
            return tuple(merged.tags)
        self.keep(output, record)
        return tuple(record.root.tags)

    def leave_container(self, module: nn.Module, name: str, output: Tensor) -> None:
        """A container's output: the innermost module whose output a composite is (an ``"output"`` hook)."""
        record = self.derived_of(output)
        if record is not None and record.composite and record.module is None:
            record.module = (module, name)

    def consume(self, tensors: list[Tensor]) -> None:
        """Recognize the composites among ``tensors``, used other than element-wise (a layer, a product with another
        layer's output, a reduction, the model output): the outermost merge is complete."""
        if not self.derived:
            return
        for t in tensors:
            record = self.derived_of(t)
            if record is not None and record.composite and not record.root.lineage.done:
                self._composite(record, t)

    def consume_inputs(self, inputs: Any) -> None:
        """:meth:`consume` the tensors of a module's ``(args, kwargs)``."""
        if self.derived:
            self.consume(_tensors(inputs))

    def clear(self) -> None:
        """Drop every record (the end of the pass: no tensor is kept)."""
        self.derived.clear()

    # ---- records and samples ----
    def derived_of(self, t: Tensor) -> _Derived | None:
        entry = self.derived.get(id(t))
        if entry is None or entry[0]() is not t:
            return None
        return entry[1]

    def _sample(self, t: Tensor) -> tuple[Tensor, ...]:
        """The sampled positions of tensors of ``t``'s shape: all of a small one, else :data:`_SAMPLES` drawn once
        with a fixed seed (the same for every tensor of that shape and device, so samples of a sub-graph pair up)."""
        key = (tuple(t.shape), t.device)
        if key not in self.sample_index:
            n = t.numel()
            if n <= _SAMPLES:
                flat = torch.arange(n)
            else:
                flat = torch.randint(n, (_SAMPLES,), generator=torch.Generator().manual_seed(0))
            self.sample_index[key] = tuple(i.to(t.device) for i in torch.unravel_index(flat, tuple(t.shape)))
        return self.sample_index[key]

    def _values(self, t: Tensor, index: tuple[Tensor, ...]) -> Tensor:
        """``t``'s values at the sampled positions, by ``index_select`` on its memory (advanced indexing ``t[index]``
        takes ~3000x longer on CPU: 16 ms for 4096 values); no copy of ``t``."""
        t = t.detach()
        key = (tuple(t.shape), t.stride(), t.device)
        offsets = self.sample_offsets.get(key)
        if offsets is None:
            offsets = sum((i * step for i, step in zip(index, t.stride())), torch.zeros_like(index[0]))
            self.sample_offsets[key] = offsets
        span = 1 + sum((n - 1) * step for n, step in zip(t.shape, t.stride()))
        return t.as_strided((span,), (1,)).index_select(0, offsets)

    def _root(self, t: Tensor, tags: dict[str, _Path], source: str | None, layout: Layout | None,
              base: _Root | None = None) -> _Derived:  # fmt: skip
        index = self._sample(t)
        xs = self._values(t, index)
        root = _Root(dict(tags), source, layout, tuple(t.shape), index, xs, weakref.ref(t), base, version=t._version)
        return _Derived(root, _ROOT_NODE, xs)

    def _derive(self, func: Any, name: str, act: Activation | None, args: tuple, kwargs: dict,
                seen: list[tuple[_Meta, Tensor]], output: Any) -> _Derived | None:  # fmt: skip
        """The record of ``output`` when this call computes it element-wise from one root (its other operands
        Python numbers, or constants: no tags, nothing upstream), else ``None``. The first element-wise call on a
        layer's looked-through output makes that tensor a root."""
        if act is None and name not in _ELEMENTWISE:
            return None
        if type(output) is not Tensor or output.ndim == 0 or output.numel() < 2 or "out" in kwargs:
            return None  # (a tensor subclass, e.g. a DTensor, is not sampled)
        shape = output.shape
        operand: dict[int, _Derived] = {}
        fresh: tuple[Tensor, _Meta] | None = None
        uniform = True  # one function of one element: no constant varies along the tensor
        for meta, t in seen:
            record = self.derived_of(t) if t.shape == shape else None
            if record is not None:
                operand[id(t)] = record
            elif meta.tags and t.shape == shape and type(t) is Tensor and (fresh is None or fresh[0] is t):
                fresh = (t, meta)
            elif meta.tags or meta.reach or self.derived_of(t) is not None:
                return None  # a second source, or a tensor computed from the input: not a function of one root
            elif t.numel() > 1:
                if t.numel() > _CONSTANT_LIMIT and not isinstance(t, nn.Parameter):
                    return None  # a large constant: no copy of it is kept for a replay
                uniform = False
        if fresh is not None:
            if operand:
                return None
            t, meta = fresh
            record = self._root(t, meta.tags, meta.source, meta.layout)
            self.keep(t, record)
            operand[id(t)] = record
        if not operand:
            return None
        records = list(operand.values())
        lineage = records[0].root.lineage
        if any(r.root.lineage is not lineage for r in records):
            return None
        count = sum(1 for _, t in seen if id(t) in operand)  # h * h counts twice
        first = args[0] if args else None
        varying_first = isinstance(first, Tensor) and id(first) in operand
        affine = act is None and (
            name in _AFFINE or (name == "mul" and count == 1) or (name == "div" and count == 1 and varying_first)
        )
        if act is not None and act.is_identity:
            affine = True
        roots = {id(r.root): r.root for r in records}
        root = records[0].root if len(roots) == 1 else lineage
        uniform = uniform and len(roots) == 1 and all(r.node is not None for r in records)
        nonlinear_in = any(r.nonlinear for r in records)
        if not uniform and affine and not nonlinear_in:  # a bias or scale by per-channel constants: a new root
            first_root = records[0].root
            return self._root(output, lineage.tags, None, first_root.layout, base=lineage)
        node = None
        if uniform:
            swap = lambda a: operand[id(a)].node if isinstance(a, Tensor) and id(a) in operand else a  # noqa: E731
            fargs, fkwargs = tree_map(swap, (args, kwargs))
            node = _Node(func, tuple(fargs), dict(fkwargs), _in_place(func, args, kwargs))
        ys = self._values(output, root.index)
        return _Derived(
            root, node, ys,
            nonlinear=nonlinear_in or not affine,
            composite=any(r.composite for r in records) or (count >= 2 and (nonlinear_in or not affine)),
            sites=tuple(dict.fromkeys(x for r in records for x in r.sites)),
            pending=tuple(dict.fromkeys(x for r in records for x in r.pending)),
            found=frozenset().union(*(r.found for r in records)),
        )  # fmt: skip

    def _module_output(self, args: tuple, kwargs: dict, output: Any, activation: Activation, found: frozenset[str],
                       merged: _Meta) -> _Derived | None:  # fmt: skip
        """The record of an activation module's output, when its input is a root or computed from one."""
        seen = [t for t in _tensors((args, kwargs))]
        if len(seen) != 1 or type(output) is not Tensor or output.shape != seen[0].shape or output.numel() < 2:
            return None
        x = seen[0]
        record = self.derived_of(x)
        if record is None:
            if not merged.tags or type(x) is not Tensor:
                return None
            meta = self.tracer.get(x)
            record = self._root(x, meta.tags, meta.source, meta.layout)
            self.keep(x, record)
        node = _Node(activation, (record.node,)) if record.node is not None else None
        return _Derived(record.root, node, self._values(output, record.root.index), not activation.is_identity,
                        record.composite, record.sites, record.pending, record.found | found)  # fmt: skip

    # ---- recognition: what replaces what ----
    def _composite(self, record: _Derived, tensor: Tensor) -> None:
        """One composite recognized: it becomes the layer's activation (``how="composite"``), its inner calls'
        sites are dropped and one site for the whole function takes their place."""
        tracer = self.tracer
        root = record.root
        root.lineage.done = True
        tracer.opaque += 1
        try:
            found = self._recognize(record)
            act = found.activation
            for name in record.sites:
                tracer.drop_site(name)
            for index in record.pending:
                tracer.settle(index, "dropped")
            for producer, path in root.tags.items():
                if producer not in tracer.found or producer in record.found:
                    tracer.found[producer] = (act, "composite", path, None)
            if act.is_identity:
                return
            producer = next(iter(root.tags), None)
            label = f"{producer or root.source or '?'}.{'composite' if found.how == 'behaviour' else act.name}"
            layout = root.layout or Layout.from_rank(len(root.shape))
            measured = tracer.measure(act, root.xs) if root.xs.is_floating_point() else None
        finally:
            tracer.opaque -= 1
        if root.source is not None:
            module = tracer.module_named(root.source)
            site = ActivationSite(label, act, "composite", module, root.source, "input", layout, producer)
            tracer.add_site(site, measured, root.values())
        elif record.module is not None and act.kind.output_derivative is not None:
            module, name = record.module
            tracer.add_site(ActivationSite(label, act, "composite", module, name, "output", layout, producer),
                            measured, tensor)  # fmt: skip
        else:
            tracer.pend(act, "composite", producer, layout, measured, label)

    def _recognize(self, record: _Derived) -> Recognition:
        """The function of a composite: its replay on a grid (:func:`recognize`) where one function of one element
        computes it and agrees with the sampled values, else judged from the samples (:func:`recognize_samples`);
        a composite no sample can judge reads as no activation, never as its inner call."""
        root = record.root
        xs, ys = root.xs, record.ys
        if record.node is not None and xs.is_floating_point():
            fn = _replay(record.node)
            try:
                like = xs.reshape((1,) * (len(root.shape) - 1) + (-1,))
                with torch.no_grad():
                    again = fn(like)
                if isinstance(again, Tensor) and _agrees(again.reshape(-1), ys.reshape(-1)):
                    with torch.no_grad():
                        found = recognize(fn, like)
                    if found is not None:
                        return found
            except Exception:  # noqa: BLE001 - a call that cannot be replayed: the samples decide
                pass
        found = recognize_samples(xs, ys) if xs.is_floating_point() and ys.is_floating_point() else None
        return found if found is not None else Recognition(get_activation(None), "placeholder")

    # ---- gates ----
    def _note_gate(self, seen: list[tuple[_Meta, Tensor]], output: Any) -> None:
        """A product of an activation's output with a tensor not computed element-wise from that activation's own
        layer: the activation's layers make a gate; a factor that is a layer's looked-through output, of the
        gate's shape, is gated by it."""
        factors = [(m, t) for m, t in seen if t.numel() > 1]
        gates = [(m, t) for m, t in factors if m.act_of]
        if not gates:
            return
        others = [(m, t) for m, t in factors if not m.act_of and (m.tags or m.upstream)]
        if not others and len(gates) >= 2:
            smallest = min(_distinct(t) for _, t in gates)
            if any(_distinct(t) != smallest for _, t in gates):  # squeeze-excite: the broadcast factor is the gate
                chosen = [(m, t) for m, t in gates if _distinct(t) == smallest]
            else:  # i * tanh(g): the factor with values in [0, 1]
                chosen = [(m, t) for m, t in gates if self._unit_range(t)]
            if chosen and len(chosen) < len(gates):
                others = [g for g in gates if all(g is not c for c in chosen)]
                gates = chosen
        if not others:
            return
        for meta, _ in gates:
            self.gates.update(meta.act_of)
        gate_meta, gate = gates[0]
        main = output if isinstance(output, Tensor) else None
        if main is None or gate.shape != main.shape or _distinct(gate) != gate.numel():
            return  # the gate is broadcast (squeeze-excite scales a feature map): nothing is gated element by element
        for meta, t in others:
            if meta.act_of or t.shape != main.shape or _distinct(t) != t.numel():
                continue
            for producer in meta.tags:
                self.gated_by.setdefault(producer, gate_meta.act_of[0])

    def _unit_range(self, t: Tensor) -> bool:
        record = self.derived_of(t)
        if record is None or not record.ys.is_floating_point():
            return False
        self.tracer.opaque += 1
        try:
            return bool(((record.ys >= 0) & (record.ys <= 1)).all())
        finally:
            self.tracer.opaque -= 1

    def _glu(self, merged: _Meta, first: Tensor | None) -> None:
        """``F.glu(proj(x))`` (``nn.GLU``): ``a * sigmoid(b)`` of the two halves: the layer gates itself, and feeds a
        sigmoid no hook sees apart from the linear half."""
        producers = list(merged.tags)
        if not producers or first is None:
            return
        sigmoid = get_activation("sigmoid")
        self.tracer.resolve(merged.tags, sigmoid, "function")
        self.gates.update(producers)
        for producer in producers:
            self.gated_by.setdefault(producer, producers[0])
        self.unwatchable.append((f"{producers[0]}.sigmoid", "the sigmoid half of glu: a hook sees the linear half too"))
