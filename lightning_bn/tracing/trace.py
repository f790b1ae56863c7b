"""One traced forward pass: which activation follows each layer, where every activation runs, and the layouts.

:func:`trace_model` runs the model once on an example input with forward hooks on every module and a
:class:`~torch.overrides.TorchFunctionMode`, and follows each tensor: which layer made it (through norms, dropout,
pooling, reshapes, scaling by a constant and additions), which module's output it is, which dimension indexes its
units, and which layers lie upstream of it. Activations are found as registered modules, as functional calls
(``F.gelu``, ``torch.tanh``, ``x.relu()``), as unregistered modules recognized by what they compute
(:func:`~lightning_bn.tracing.recognize`, learnable element-wise modules included), inside norm subclasses that apply
one (timm's norm-act layers), and as *composites* written in ``forward`` (``h * torch.sigmoid(h)`` is SiLU, not its
sigmoid). Composites and *gates* (:attr:`LayerTrace.gate`, :attr:`LayerTrace.gated_by`) are followed by
:class:`~lightning_bn.tracing.composite.Composites`, which the tracer calls at fixed points; its module docstring says
what is tracked, when recognition runs and what replaces what.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from lightning_bn.activations import Activation, activation_of_call, activation_of_module, get_activation
from lightning_bn.layers import get_layer_kind
from lightning_bn.tracing.composite import Composites
from lightning_bn.tracing.hooks import as_call, model_state, run_forward
from lightning_bn.tracing.model_map import ActivationSite, AttentionSite, LayerTrace, Layout, ModelMap
from lightning_bn.tracing.recognize import Recognition, recognize
from lightning_bn.tracing.types import (
    _LOOK_THROUGH,
    _NORM_CALLS,
    _PLACEHOLDER_TYPES,
    _REARRANGE,
    _SAME_VALUES,
    _SCALE_OPS,
    _SCORE_OPS,
    _SHAPE_FROM_SECOND,
    LAYER_TYPES,
    NORM_TYPES,
    PASS_TYPES,
    _canonical,
    _is_method,
    _is_torch_class,
    _layer_layout,
    _permutation,
    _tensors,
)

__all__ = ["LAYER_TYPES", "NORM_TYPES", "PASS_TYPES", "trace_activations", "trace_call", "trace_model"]


_INPUT = "<input>"


@dataclass(frozen=True)
class _Path:
    through: tuple[str, ...] = ()
    first_norm: str | None = None
    last_norm: str | None = None

    def step(self, what: str, norm: str | None = None) -> _Path:
        return _Path(self.through + (what,), self.first_norm or norm, norm or self.last_norm)


@dataclass
class _Meta:
    """What the trace knows of one live tensor."""

    tags: dict[str, _Path] = field(default_factory=dict)  # layers it came from, through looked-through steps
    depth: int = 0  # layers on the longest path to it (residual detection)
    reach: frozenset[str] = frozenset()  # the last layers upstream of it, through any op
    source: str | None = None  # the module whose output it is (same values, same positions)
    layout: Layout | None = None
    site: int | None = None  # index of the activation call whose output it is, when no hook can see that call
    scores: tuple[tuple[str, ...], tuple[str, ...]] | None = None  # attention logits q·kᵀ: (q layers, k layers)
    heads: tuple[int | None, int | None, int] | None = None  # of attention logits: (heads, kv heads, head dim)
    act_of: tuple[str, ...] = ()  # the layers whose activation's output it is (possibly rearranged): a gate candidate

    @property
    def upstream(self) -> frozenset[str]:
        """The layers upstream of it (:attr:`reach` without the model input)."""
        return self.reach - {_INPUT}


@dataclass
class _PendingCall:
    activation: Activation
    how: str  # as found; "watched" once a hook sees it, "dropped" when it was the inner call of a composite
    producer: str | None
    layout: Layout
    measured: Tensor | None = None
    name: str | None = None


def _std_and_nonfinite(x: Tensor) -> Tensor:
    """(std over the finite elements, count of the others) in float64, with no activation-sized float64 copy: the
    trace runs on real batches of real models, where one such copy is megabytes."""
    finite = torch.isfinite(x)
    count = finite.sum()
    if x.numel() < 2:
        return torch.tensor([float("nan"), float(x.numel() - int(count))], dtype=torch.float64, device=x.device)
    v = torch.where(finite, x, 0).float()
    n = count.double().clamp_min(1)
    mean = v.sum(dtype=torch.float64) / n
    centered = torch.where(finite, v - mean.float(), 0)
    var = (centered * centered).sum(dtype=torch.float64) / (n - 1).clamp_min(1)
    std = torch.where(count > 1, var.sqrt(), torch.full_like(var, float("nan")))
    return torch.stack([std, (x.numel() - count).double()])


class _Tracer:
    """Bookkeeping of one traced forward pass."""

    def __init__(self, model: nn.Module) -> None:
        self.names = {m: n for n, m in model.named_modules()}
        self.recognized: dict[nn.Module, Recognition] = {}
        self.roles: dict[nn.Module, str] = {m: self._role(m) for m in self.names}
        self.info: dict[int, tuple[weakref.ref, _Meta]] = {}
        self.layers: dict[str, LayerTrace] = {}
        self.measured: dict[str, Tensor] = {}
        self.found: dict[str, tuple[Activation, str, _Path, str | None]] = {}
        self.norm_after: dict[str, str] = {}
        self.residual_norm: dict[str, str] = {}
        self.residual: set[str] = set()
        self.weights = {id(p): n for m, n in self.names.items() if self.roles[m] == "layer" for p in
                        m.parameters(recurse=False)}  # fmt: skip
        self.functional: dict[str, None] = {}  # layers whose weight went into a torch function
        self.shortcut: dict[str, Tensor] = {}  # residual-branch layer -> std of the shortcut it is added to (device)
        self.attention: list[tuple[str, str]] = []
        self.attention_sites: list[AttentionSite] = []
        self.sites: list[ActivationSite] = []
        self.site_keys: set[tuple[int, str, str]] = set()
        self.pending: list[_PendingCall] = []
        self.placeholders: list[str] = []
        self.stack: list[nn.Module] = []
        self.called: dict[nn.Module, None] = {}  # modules in the order of their first call
        self.site_measures: dict[str, Tensor] = {}  # site name -> (input std, saturated fraction), on the device
        self.composites = Composites(self)  # element-wise sub-graphs from a layer (composites) and gates
        self.opaque = 0
        #: a live trace (:func:`trace_call`): called with each new site and the tensor its hook would see
        self.observe: Callable[[ActivationSite, Tensor], None] | None = None
        #: a live trace that failed: why (it records nothing more; the user's forward goes on)
        self.failed: str | None = None
        self.live = False

    def _role(self, module: nn.Module) -> str:
        registered = activation_of_module(module)
        if registered is not None:
            self.recognized[module] = Recognition(registered, "placeholder" if registered.is_identity else "registry")
            return "placeholder" if registered.is_identity else "activation"
        if get_layer_kind(module) is not None:
            return "layer"
        if isinstance(module, NORM_TYPES):
            return "norm" if _is_torch_class(module) else "norm-act"  # a subclass may apply an activation inside
        if isinstance(module, _PLACEHOLDER_TYPES):
            return "placeholder"
        if isinstance(module, PASS_TYPES):
            return "pass"
        if next(module.children(), None) is None and (
            next(module.parameters(), None) is None or next(module.buffers(), None) is None
        ):
            return "candidate"  # decided on its first call, by what it computes (a learnable swish too)
        return "container"

    def guarded(self, fn: Callable, *args: Any) -> None:
        """Run one step of the bookkeeping; in a live trace, a failure stops the trace, never the user's forward."""
        if not self.live:
            fn(*args)
            return
        try:
            fn(*args)
        except Exception as err:  # noqa: BLE001 - reported by trace_call, the training step goes on
            self.failed = f"{type(err).__name__}: {err}"

    # ---- tensor metadata ----
    def get(self, t: Tensor) -> _Meta:
        entry = self.info.get(id(t))
        if entry is None or entry[0]() is not t:
            return _Meta()
        return entry[1]

    def put(self, outputs: Any, meta: _Meta) -> None:
        for t in _tensors(outputs):
            self.info[id(t)] = (weakref.ref(t), meta)

    def gather(self, inputs: Any) -> tuple[list[tuple[_Meta, Tensor]], _Meta]:
        seen = [(self.get(t), t) for t in _tensors(inputs)]
        merged = _Meta()
        for meta, _ in seen:
            for producer, path in meta.tags.items():
                merged.tags.setdefault(producer, path)
            merged.reach |= meta.reach
            merged.depth = max(merged.depth, meta.depth)
        return seen, merged

    def resolve(self, tags: dict[str, _Path], act: Activation, how: str, consumer: str | None = None) -> None:
        for producer, path in tags.items():
            self.found.setdefault(producer, (act, how, path, consumer))

    def measure(self, activation: Activation, x: Tensor) -> Tensor:
        """(std, saturated fraction) of an activation's input, over its finite elements; no step of the model."""
        self.opaque += 1
        try:
            v = x.detach()
            finite = torch.isfinite(v)
            count = finite.sum()
            saturated = (activation.saturated(v) & finite).sum() / count.clamp_min(1)
            return torch.stack([_std_and_nonfinite(v)[0], saturated.double()])
        finally:
            self.opaque -= 1

    def add_site(self, site: ActivationSite, measured: Tensor | None = None, seen: Tensor | None = None) -> str | None:
        """Add a site (a unique name); ``None`` where the same hook already sees this activation."""
        key = (id(site.module), site.hook, site.activation.describe())
        if key in self.site_keys:
            if site.hook == "module":  # one activation module called again: its calls are counted
                seen = next((s for s in self.sites if s.module is site.module and s.hook == "module"), None)
                if seen is not None:
                    seen.calls += 1
            return None  # the same hook already sees this activation at every call
        self.site_keys.add(key)
        taken = {s.name for s in self.sites}
        name, k = site.name, 2
        while name in taken:
            name, k = f"{site.name}#{k}", k + 1
        site.name = name
        self.sites.append(site)
        if measured is not None:
            self.site_measures[name] = measured
        if self.observe is not None and seen is not None:
            self.opaque += 1
            try:
                self.observe(site, seen)
            finally:
                self.opaque -= 1
        return name

    def drop_site(self, name: str) -> None:
        """Remove a site added earlier (the inner call of a composite)."""
        for i, site in enumerate(self.sites):
            if site.name == name:
                del self.sites[i]
                self.site_keys.discard((id(site.module), site.hook, site.activation.describe()))
                self.site_measures.pop(name, None)
                return

    # ---- module hooks ----
    def enter(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        role = self.roles[module]
        if role == "candidate":
            role = self._decide(module, args)
        if role != "container":
            self.composites.consume_inputs((args, kwargs))
        if role == "activation":
            seen, merged = self.gather((args, kwargs))
            name = self.names[module]
            found = self.recognized[module]
            how = "module" if found.how == "registry" else found.how
            self.composites.enter_activation(module, merged.tags)
            self.resolve(merged.tags, found.activation, how, name)
            first = seen[0][1] if seen else None
            if first is not None:
                layout = seen[0][0].layout or Layout.from_rank(first.ndim)
                producer = next(iter(merged.tags), None)
                site = ActivationSite(name, found.activation, how, module, name, "module", layout, producer)
                self.add_site(site, self.measure(found.activation, first) if first.is_floating_point() else None)
        if module not in self.called:
            self.called[module] = None
        self.stack.append(module)
        if role in ("layer", "norm", "pass", "placeholder", "activation"):
            self.opaque += 1

    def _decide(self, module: nn.Module, args: tuple) -> str:
        like = next((a for a in args if isinstance(a, Tensor) and a.is_floating_point()), None)
        self.opaque += 1  # the grid evaluation is no step of the model
        try:
            with torch.no_grad():
                found = recognize(module, like) if like is not None else None
        finally:
            self.opaque -= 1
        if found is None:
            role = "container"
        else:
            self.recognized[module] = found
            role = "placeholder" if found.is_placeholder else "activation"
        self.roles[module] = role
        return role

    def leave(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        role = self.roles[module]
        self.stack.pop()
        if role in ("layer", "norm", "pass", "placeholder", "activation"):
            self.opaque -= 1
        name = self.names[module]
        seen, merged = self.gather((args, kwargs))
        main = output[0] if isinstance(output, (tuple, list)) and output else output
        first = seen[0] if seen else (_Meta(), None)
        same_shape = isinstance(main, Tensor) and first[1] is not None and first[1].shape == main.shape
        layout = first[0].layout if same_shape else None
        if role == "layer":
            if isinstance(module, nn.MultiheadAttention):  # its attention runs inside the layer, opaque to the trace
                heads = int(module.num_heads)
                self.stack.append(module)
                self._note_site("mha", (name,), (name,), (heads, heads, int(module.head_dim)))
                self.stack.pop()
            self._leave_layer(module, name, merged, output, main)
        elif role == "norm":
            for producer, path in merged.tags.items():
                if path.first_norm is None:
                    self.norm_after.setdefault(producer, name)
            tags = {p: path.step(type(module).__name__, name) for p, path in merged.tags.items()}
            self.put(output, _Meta(tags, merged.depth, merged.reach, name, layout))
        elif role in ("pass", "placeholder"):
            if role == "placeholder" and name not in self.placeholders:
                self.placeholders.append(name)
            tags = {p: path.step(type(module).__name__) for p, path in merged.tags.items()}
            self.put(output, _Meta(tags, merged.depth, merged.reach, name, layout))
        elif role == "activation":
            activation = self.recognized[module].activation
            act_of = self.composites.leave_activation(module, args, kwargs, main, activation, merged)
            self.put(output, _Meta({}, merged.depth, merged.reach, name, layout, act_of=act_of))
        elif isinstance(main, Tensor):  # a container or norm-act module: what ran inside already tagged the output
            meta = self.get(main)
            self.composites.leave_container(module, name, main)
            if meta.site is not None:
                self._watch_call_output(meta.site, module, name, main)
            if meta.source is None or meta.site is not None:
                self.put(main, _Meta(meta.tags, meta.depth, meta.reach, name, meta.layout, act_of=meta.act_of))

    def _leave_layer(self, module: nn.Module, name: str, merged: _Meta, output: Any, main: Any) -> None:
        if name not in self.layers and isinstance(main, Tensor):
            self.opaque += 1  # the measurement is no step of the model
            self.measured[name] = _std_and_nonfinite(main.detach())
            self.opaque -= 1
            self.layers[name] = LayerTrace(
                name, module, get_activation(None), "none", tuple(main.shape), layout=_layer_layout(module, main)
            )
        reach = frozenset({name})
        self.put(output, _Meta({}, merged.depth + 1, reach))
        if isinstance(main, Tensor):
            layout = self.layers[name].layout if name in self.layers else _layer_layout(module, main)
            self.put(main, _Meta({name: _Path()}, merged.depth + 1, reach, name, layout))

    def _watch_call_output(self, index: int, module: nn.Module, name: str, output: Tensor) -> None:
        call = self.pending[index]
        if call.how == "dropped" or call.activation.kind.output_derivative is None:
            return  # saturation cannot be read off the output of this kind: stays unwatchable
        site_name = f"{call.producer or name}.{call.activation.name}"
        self.add_site(ActivationSite(site_name, call.activation, call.how, module, name, "output", call.layout,
                                     call.producer), call.measured, output)  # fmt: skip
        self.settle(index, "watched")

    # ---- every torch function call outside the opaque modules ----
    def call(self, func: Any, args: tuple, kwargs: dict, output: Any) -> None:
        name = _canonical(func)
        # x.expand_as(y), x.view_as(y), x.type_as(y): y gives a shape or a dtype, no values
        seen, merged = self.gather(args[:1] if name in _SHAPE_FROM_SECOND else (args, kwargs))
        for _, t in seen:
            if id(t) in self.weights and isinstance(t, nn.Parameter):
                self.functional.setdefault(self.weights[id(t)])
        first_meta, first = seen[0] if seen else (_Meta(), None)
        main = output[0] if isinstance(output, (tuple, list)) and output else output
        same_shape = isinstance(main, Tensor) and first is not None and first.shape == main.shape
        layout = first_meta.layout if same_shape else None
        order = _permutation(name, args, first.ndim) if first is not None and first_meta.layout is not None else None
        if order is not None:
            layout = first_meta.layout.permuted(order)
        source = first_meta.source if same_shape and name in _SAME_VALUES else None
        act = activation_of_call(func, args, kwargs) if merged.tags or first is not None else None
        derived = self.composites.call(func, name, act, args, kwargs, seen, merged, output)
        if act is not None and not act.is_identity and first is not None:
            how = "method" if _is_method(func) else "function"
            new = frozenset(p for p in merged.tags if p not in self.found)
            self.resolve(merged.tags, act, how)
            act_of = tuple(derived.root.tags) if derived is not None else tuple(merged.tags)
            site, index = self._call_site(act, how, first_meta, first, merged, output, act_of)
            if derived is not None:
                self.composites.inner_call(main, derived, site, index, new)
            return
        if derived is not None:
            self.composites.keep(main, derived)
            if derived.nonlinear:  # a nonlinear function of the root's layers: an activation's output
                self.put(output, _Meta({}, merged.depth, merged.reach, source, layout,
                                       act_of=tuple(derived.root.tags)))  # fmt: skip
                return
        if self._attention_call(name, seen, merged, output):
            return
        if not merged.tags:
            act_of = first_meta.act_of if name in _REARRANGE and first is not None else ()
            self.put(output, _Meta({}, merged.depth, merged.reach, source, layout, act_of=act_of))
            return
        big = [(m, t) for m, t in seen if t.numel() > 1]
        if name in _SCALE_OPS and sum(1 for m, _ in big if m.tags) == 1:  # x * constant, or q * cos (rotary)
            tags = {p: path.step(name) for p, path in merged.tags.items()}
        elif name in _NORM_CALLS and self._inside_norm() is not None:
            norm = self._inside_norm()
            for producer, path in merged.tags.items():
                if path.first_norm is None:
                    self.norm_after.setdefault(producer, norm)
            tags = {p: path.step(name, norm) for p, path in merged.tags.items()}
        elif name in _LOOK_THROUGH:
            if name in ("add", "sub") and len(big) >= 2 and len({tuple(t.shape) for _, t in big}) == 1:
                self._note_residual(big)
            tags = {p: path.step(name) for p, path in merged.tags.items()}
        else:
            tags = {}
        self.put(output, _Meta(tags, merged.depth, merged.reach, source, layout))

    def _attention_call(self, name: str, seen: list[tuple[_Meta, Tensor]], merged: _Meta, output: Any) -> bool:
        """Follow attention logits q·kᵀ to their softmax; True if the call was about attention."""
        if name == "scaleddotproductattention" and len(seen) >= 2:
            self._note_attention(seen[0][0].tags, seen[1][0].tags)
            if seen[0][0].tags and seen[1][0].tags:
                self._note_site("sdpa", tuple(seen[0][0].tags), tuple(seen[1][0].tags),
                                _head_shape(seen[0][1], seen[1][1]))  # fmt: skip
            return False
        found = next((m for m, _ in seen if m.scores is not None), None)
        scores = found.scores if found is not None else None
        if scores is not None and name in ("softmax", "logsoftmax"):
            self._note_attention(dict.fromkeys(scores[0]), dict.fromkeys(scores[1]))
            if name == "softmax" and found.heads is not None:
                self._note_site("softmax", scores[0], scores[1], found.heads)
            return False
        if scores is not None and name in _SCORE_OPS:
            self.put(output, _Meta({}, merged.depth, merged.reach, scores=scores, heads=found.heads))
            return True
        tagged = [(m, t) for m, t in seen if m.tags and t.ndim >= 2]
        if name in ("matmul", "bmm", "einsum") and len(tagged) == 2:
            self.put(output, _Meta({}, merged.depth, merged.reach, scores=(tuple(tagged[0][0].tags),
                                                                           tuple(tagged[1][0].tags)),
                                   heads=_head_shape(tagged[0][1], tagged[1][1], transposed=True)))  # fmt: skip
            return True
        return False

    def _note_attention(self, queries: dict[str, Any], keys: dict[str, Any]) -> None:
        for q in queries:
            for k in keys:
                if (q, k) not in self.attention:
                    self.attention.append((q, k))

    def _note_site(self, how: str, queries: tuple[str, ...], keys: tuple[str, ...],
                   heads: tuple[int | None, int | None, int]) -> None:  # fmt: skip
        """An attention call, named after the module whose ``forward`` made it."""
        module = self.names[self.stack[-1]] if self.stack else ""
        call = sum(1 for a in self.attention_sites if a.module_name == module)
        name = module if call == 0 else f"{module}:{call}"
        self.attention_sites.append(AttentionSite(name, module, how, queries, keys, *heads, call=call))  # type: ignore[arg-type]

    def _inside_norm(self) -> str | None:
        if self.stack and self.roles[self.stack[-1]] == "norm-act":
            return self.names[self.stack[-1]]
        return None

    def _call_site(self, act: Activation, how: str, meta: _Meta, first: Tensor, merged: _Meta, output: Any,
                   act_of: tuple[str, ...] = ()) -> tuple[str | None, int | None]:  # fmt: skip
        """The site of an activation call, or a pending call no hook sees yet: ``(site name, pending index)``."""
        layout = meta.layout or Layout.from_rank(first.ndim)
        producer = next(iter(merged.tags), None)
        site_index = site_name = None
        measured = self.measure(act, first) if first.is_floating_point() else None
        if meta.source is not None:
            module = self.module_named(meta.source)
            site = ActivationSite(f"{producer or meta.source}.{act.name}", act, how, module, meta.source, "input",
                                  layout, producer)  # fmt: skip
            site_name = self.add_site(site, measured, first)
        else:
            site_index = self.pend(act, how, producer, layout, measured)
        self.put(output, _Meta({}, merged.depth, merged.reach, None, layout, site_index, act_of=act_of))
        return site_name, site_index

    def module_named(self, name: str) -> nn.Module:
        return next(m for m, n in self.names.items() if n == name)

    def pend(self, act: Activation, how: str, producer: str | None, layout: Layout, measured: Tensor | None = None,
             name: str | None = None) -> int:  # fmt: skip
        """An activation call no hook sees yet: its index in :attr:`pending`."""
        self.pending.append(_PendingCall(act, how, producer, layout, measured, name))
        return len(self.pending) - 1

    def settle(self, index: int, how: str) -> None:
        """A pending call ``"watched"`` (a hook sees it) or ``"dropped"`` (the inner call of a composite)."""
        call = self.pending[index]
        self.pending[index] = _PendingCall(call.activation, how, call.producer, call.layout)

    def _note_residual(self, operands: list[tuple[_Meta, Tensor]]) -> None:
        deepest = max(m.depth for m, _ in operands)
        if all(m.depth == deepest for m, _ in operands):
            return  # no shallower shortcut: not recognizably a residual connection
        if not all(m.reach for m, _ in operands):
            return  # a parameter or constant added (position embeddings, a bias), not the input or a layer's output
        shallow = next(t for m, t in operands if m.depth < deepest)
        std = None
        for meta, _ in operands:
            if meta.depth == deepest:
                self.residual.update(meta.tags)
                for producer, path in meta.tags.items():
                    if path.last_norm is not None:
                        self.residual_norm.setdefault(producer, path.last_norm)
                    if producer not in self.shortcut and shallow.is_floating_point():
                        if std is None:
                            self.opaque += 1  # the measurement is no step of the model
                            std = _std_and_nonfinite(shallow.detach())[0]
                            self.opaque -= 1
                        self.shortcut[producer] = std

    def finish(self, output: Any) -> ModelMap:
        final: frozenset[str] = frozenset()
        self.composites.consume(_tensors(output))
        for t in _tensors(output):
            meta = self.get(t)
            for producer, path in meta.tags.items():  # a residual branch's last layer reaches the output via its add
                how = "residual" if producer in self.residual else "output"
                self.resolve({producer: path}, get_activation(None), how)
            final |= meta.upstream
        measured = torch.stack(list(self.measured.values())).cpu().tolist() if self.measured else []
        shortcut = dict(zip(self.shortcut, torch.stack(list(self.shortcut.values())).cpu().tolist())) if (
            self.shortcut) else {}  # fmt: skip
        for (name, trace), (std, nonfinite) in zip(self.layers.items(), measured):
            trace.shortcut_std = shortcut.get(name, float("nan"))
            if name in self.found:
                act, how, path, consumer = self.found[name]
                trace.activation, trace.how, trace.through, trace.consumer = act, how, list(path.through), consumer
            trace.norm_after = self.norm_after.get(name)
            trace.residual_norm = self.residual_norm.get(name)
            trace.residual = name in self.residual
            trace.output_std, trace.nonfinite, trace.final = std, int(nonfinite), name in final
            trace.gate, trace.gated_by = name in self.composites.gates, self.composites.gated_by.get(name)
        unwatchable = [
            (c.name or f"{c.producer or '?'}.{c.activation.name}", "its input and output belong to no module")
            for c in self.pending
            if c.how not in ("watched", "dropped")
        ] + self.composites.unwatchable
        self.info.clear()
        self.composites.clear()
        if self.site_measures:
            values = torch.stack(list(self.site_measures.values())).cpu().tolist()
            measured = dict(zip(self.site_measures, values))
            for site in self.sites:
                if site.name in measured:
                    site.input_std, site.saturation = measured[site.name]
        order = [self.names[m] for m in self.called]
        functional = [n for n in self.functional if n not in self.layers]
        return ModelMap(self.layers, self.sites, self.placeholders, unwatchable, order=order, attention=self.attention,
                        functional=functional, attention_sites=self.attention_sites)  # fmt: skip


def _head_shape(q: Tensor, k: Tensor, transposed: bool = False) -> tuple[int | None, int | None, int]:
    """``(heads, kv heads, head dim)`` of attention between ``q`` ``(..., H, T, D)`` and ``k`` ``(..., Hkv, S, D)``
    (``transposed``: ``kᵀ``, ``(..., Hkv, D, S)``); heads ``None`` where they are folded into the batch (3-d)."""
    heads = int(q.shape[-3]) if q.ndim >= 4 else None
    kv_heads = int(k.shape[-3]) if k.ndim >= 4 else None
    return heads, kv_heads, int(q.shape[-1])


class _TraceMode(TorchFunctionMode):
    def __init__(self, tracer: _Tracer) -> None:
        super().__init__()
        self.tracer = tracer

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        output = func(*args, **kwargs)
        if not self.tracer.opaque and self.tracer.failed is None:
            self.tracer.guarded(self.tracer.call, func, args, kwargs, output)
        return output


def _hooks(model: nn.Module, tracer: _Tracer) -> Iterator[Any]:
    def enter(*args: Any) -> None:
        if tracer.failed is None:
            tracer.guarded(tracer.enter, *args)

    def leave(*args: Any) -> None:
        if tracer.failed is None:
            tracer.guarded(tracer.leave, *args)

    for module in model.modules():
        if isinstance(module, torch.jit.ScriptModule):  # no hook can go on it: its call is opaque to the trace
            continue
        yield module.register_forward_pre_hook(enter, with_kwargs=True)
        yield module.register_forward_hook(leave, with_kwargs=True)


def trace_model(model: nn.Module, example_input: Any, *, train: bool = False, batch_stats: bool = False) -> ModelMap:
    """Run ``model`` once on ``example_input`` and map its layers, activations, layouts and placeholders.

    Activation modules are seen by forward pre-hooks; functional calls (``F.gelu``), torch functions
    (``torch.tanh``) and tensor methods (``x.relu()``) by a ``TorchFunctionMode``, all asked of the registry
    (:func:`~lightning_bn.activations.activation_of_call`); a module of no known class that acts element-wise is
    recognized by what it computes (:func:`~lightning_bn.tracing.recognize`), parameters and all (a learnable
    swish). Each layer's output is followed through norms, dropout, pooling, reshapes, scaling by a constant and
    additions; the first activation it meets wins, unless it is the inner call of a *composite*: element-wise calls
    from the output to a merge of it with a nonlinear function of it (``h * torch.sigmoid(h)``, a written-out GELU
    or Mish), recognized as one function where the merged result is used other than element-wise (``how="composite"``:
    SiLU, not its sigmoid; a kind by behaviour where none matches). A product of an activation's output with a tensor
    not computed element-wise from the same layer marks a gate (:attr:`LayerTrace.gate`, :attr:`LayerTrace.gated_by`).
    The pass runs under ``no_grad`` in eval mode (``train=True``: in training mode, with buffers and random state
    restored afterwards) and restores every module's mode. No tensor is kept after it.

    Args:
        model: any ``nn.Module``; ``forward`` may have Python control flow and nested modules.
        example_input: a Tensor, a tuple of positional args, or a dict of keyword args.
        train: trace in training mode (batch statistics) instead of eval mode.
        batch_stats: in eval mode, let BatchNorm normalize with the batch's statistics as in training (the signal a
            training step sees, without dropout); running statistics are restored.

    Returns:
        a :class:`~lightning_bn.tracing.ModelMap`.

    Raises:
        ValueError: if ``forward`` raises on the example input; the message names the exception.

    Example::

        >>> import torch.nn.functional as F
        >>> class Net(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.fc, self.bn, self.out = nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2)
        ...     def forward(self, x):
        ...         return self.out(F.silu(self.bn(self.fc(x))))
        >>> found = trace_model(Net(), torch.randn(3, 4))
        >>> [(t.name, t.activation.name, t.how, t.through, str(t.layout)) for t in found.layers.values()]
        [('fc', 'silu', 'function', ['BatchNorm1d'], '(N, C)'), ('out', 'identity', 'output', [], '(N, C)')]
        >>> [(s.name, s.hook, s.module_name) for s in found.sites]
        [('fc.silu', 'input', 'bn')]
    """
    args, kwargs = as_call(model, example_input)
    tracer = _Tracer(model)
    tracer.put((args, kwargs), _Meta(reach=frozenset({_INPUT})))  # what flows from the input (residual shortcuts)
    handles = list(_hooks(model, tracer))
    try:
        with model_state(
            model, train=train, grad=False, restore_buffers=train, fork_rng=train, calibration=train,
            batch_stats=batch_stats,
        ):  # fmt: skip
            with _TraceMode(tracer):
                output = run_forward(model, args, kwargs)
            return tracer.finish(output)
    finally:
        for handle in handles:
            handle.remove()
        tracer.info.clear()
        tracer.composites.clear()


def trace_call(
    model: nn.Module,
    forward: Callable[..., Any],
    args: tuple,
    kwargs: dict,
    observe: Callable[[ActivationSite, Tensor], None] | None = None,
) -> tuple[Any, ModelMap | None, str | None]:
    """Trace a call of ``model`` while it runs for real: ``forward(*args, **kwargs)`` is ``model``'s own forward (the
    call in progress, its hooks already run), executed once, in whatever mode and grad state the caller is in.

    What :func:`trace_model` finds, without a second forward pass (a stateful module advances once). The bookkeeping
    never raises into the user's forward: a failure stops the trace and is returned instead of a map. ``observe`` is
    called with each new activation site and the tensor its watching hook would see (so a monitor can measure this
    very call). Returns ``(output, map or None, why the trace failed or None)``.

    Example::

        >>> net = nn.Sequential(nn.Linear(4, 8), nn.Tanh())
        >>> out, found, failed = trace_call(net, net.forward, (torch.randn(2, 4),), {})
        >>> out.shape, [s.name for s in found.sites], failed
        (torch.Size([2, 8]), ['1'], None)
    """
    tracer = _Tracer(model)
    tracer.live, tracer.observe = True, observe
    tracer.put((args, kwargs), _Meta(reach=frozenset({_INPUT})))
    handles = list(_hooks(model, tracer))
    try:
        tracer.guarded(tracer.enter, model, args, kwargs)  # the call in progress: its pre-hooks have run
        with _TraceMode(tracer):
            output = forward(*args, **kwargs)
        tracer.guarded(tracer.leave, model, args, kwargs, output)
        found = None
        if tracer.failed is None:
            try:
                found = tracer.finish(output)
            except Exception as err:  # noqa: BLE001 - reported to the caller
                tracer.failed = f"{type(err).__name__}: {err}"
        return output, found, tracer.failed
    finally:
        for handle in handles:
            handle.remove()
        tracer.info.clear()
        tracer.composites.clear()


def trace_activations(model: nn.Module, example_input: Any) -> dict[str, LayerTrace]:
    """``{qualified name: LayerTrace}`` of every layer of :data:`LAYER_TYPES` that ran: :func:`trace_model`'s layers.

    Example::

        >>> net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
        >>> [(n, t.activation.name) for n, t in trace_activations(net, torch.randn(3, 4)).items()]
        [('0', 'tanh'), ('2', 'identity')]
    """
    return trace_model(model, example_input).layers
