"""The model map: what one traced forward pass learned about a model, shared by every part of the library.

Per layer (:class:`LayerTrace`): the activation its output feeds and how it was found, its output shape, layout
and std, the norms on the way. Per activation (:class:`ActivationSite`): where it is, which module to hook to see
it, and the layout its units are counted along. And the placeholders (modules that return their input in eval
mode), which are no activation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Literal

from torch import nn

from lightning_bn.activations import Activation

__all__ = ["ActivationSite", "AttentionSite", "LayerTrace", "Layout", "ModelMap"]

_FIRST = {3: "(N, C, L)", 4: "(N, C, H, W)", 5: "(N, C, D, H, W)"}
_LAST = {2: "(N, C)", 3: "(N, T, C)", 4: "(N, H, W, C)", 5: "(N, D, H, W, C)"}


@dataclass(frozen=True)
class Layout:
    """Which dimension of a tensor indexes units (features or channels): dead units are counted along it.

    Example::

        >>> str(Layout(1, 3)), str(Layout(2, 3)), str(Layout(1, 4)), Layout(1, 3).known
        ('(N, C, L)', '(N, T, C)', '(N, C, H, W)', True)
    """

    unit_dim: int
    ndim: int
    known: bool = True  # False: read from the rank alone, because the data flow did not tell

    def __str__(self) -> str:
        if self.ndim >= 2 and self.unit_dim == self.ndim - 1 and self.ndim in _LAST:
            return _LAST[self.ndim]
        if self.unit_dim == 1 and self.ndim in _FIRST:
            return _FIRST[self.ndim]
        dims = [f"d{i}" for i in range(self.ndim)]
        if 0 <= self.unit_dim < self.ndim:
            dims[self.unit_dim] = "C"
        return f"({', '.join(dims)})"

    def permuted(self, order: list[int]) -> Layout:
        """The layout after ``x.permute(order)``."""
        return Layout(order.index(self.unit_dim), self.ndim, self.known)

    @staticmethod
    def from_rank(ndim: int) -> Layout:
        """The fallback when the data flow does not tell: features last for ``(N, T, C)``, channels at 1 otherwise."""
        if ndim <= 1:
            return Layout(0, max(ndim, 1), known=False)
        return Layout(ndim - 1 if ndim == 3 else 1, ndim, known=False)


@dataclass
class LayerTrace:
    """What one layer's output meets on its way through ``forward``.

    Attributes:
        name: qualified module name.
        module: the layer.
        activation: the first nonlinearity consuming the output (identity for logits and for outputs consumed by
            no nonlinearity); for a composite written in ``forward`` (``h * torch.sigmoid(h)``), the whole
            element-wise function, never its inner call.
        how: ``"module"`` (an activation module), ``"function"`` (``F.silu``, ``torch.tanh``), ``"method"``
            (``x.relu()``), ``"numeric"`` (a module recognized by what it computes, e.g. transformers'
            ``NewGELUActivation``), ``"behaviour"`` (an element-wise nonlinearity no registered kind matches),
            ``"composite"`` (an element-wise sub-graph of calls from the output to a merge of it with a nonlinear
            function of it, recognized as one function: ``h * torch.sigmoid(h)`` is SiLU; a kind "by behaviour"
            where none matches), ``"output"`` (reaches the model output without one), ``"residual"`` (a residual
            branch's last layer whose add reaches the model output: an encoder's last block) or ``"none"`` (consumed
            by something else).
        output_shape: shape of the layer's output on the example input (first call).
        through: steps looked through on the way, e.g. ``["BatchNorm1d", "Dropout", "add"]``.
        consumer: qualified name of the activation module, when found as a module.
        norm_after: qualified name of the first norm module consuming the output (through reshapes/dropout).
        residual_norm: the last norm module on this layer's path into a residual addition, when the layer is on the
            deeper operand (the residual branch): the norm ``zero_init_residual_`` zeroes.
        output_std: standard deviation of the layer's output on the example input (first call).
        layout: which dimension of the output indexes the layer's units.
        final: the output reaches the model's output with no other layer in between (logits, ``sigmoid(head(x))``).
        nonfinite: inf/NaN elements in the output on the example input (first call).
        residual: the output is on the deeper operand of a residual addition (a residual branch).
        shortcut_std: for a residual branch, the std of the shortcut operand it is first added to, on the example
            input (the residual stream's scale there); NaN otherwise.
        gate: the activation after this layer makes a *gate*: its output multiplies a tensor that is not computed
            element-wise from this layer's own output (squeeze-excite's ``x * sigmoid(fc2(s))``, an LSTM gate
            ``sigmoid(xi(x) + hi(h)) * c``, SwiGLU's ``silu(gate_proj(x)) * up_proj(x)``, ``F.glu`` / ``nn.GLU``,
            ``a * sigmoid(b)`` of ``proj(x).chunk(2, -1)``). A composite (``h * sigmoid(h)``) is no gate. Where
            both factors are activations of different layers, a broadcast factor is the gate (squeeze-excite), else
            one with values in [0, 1] (the LSTM's ``i * tanh(g)``: only ``i``), else both.
        gated_by: the layer whose gate multiplies this layer's output, when that output reaches the product through
            looked-through steps only (no nonlinearity) and with the same shape as the gate (no broadcast): SwiGLU's
            ``up_proj.gated_by == "gate_proj"``; for ``F.glu(proj(x))`` and the chunked form the layer gates itself
            (``proj.gated_by == "proj"``, ``proj.gate``). ``None`` otherwise (squeeze-excite scales a feature map by
            broadcasting: its gate's layer has ``gate``, the feature map's layer no ``gated_by``).
    """

    name: str
    module: nn.Module
    activation: Activation
    how: str
    output_shape: tuple[int, ...]
    through: list[str] = field(default_factory=list)
    consumer: str | None = None
    norm_after: str | None = None
    residual_norm: str | None = None
    output_std: float = math.nan
    layout: Layout | None = None
    final: bool = False
    nonfinite: int = 0
    residual: bool = False
    shortcut_std: float = math.nan
    gate: bool = False
    gated_by: str | None = None


SiteHook = Literal["module", "input", "output"]


@dataclass
class ActivationSite:
    """One place where a nonlinearity runs, and how to watch it.

    Attributes:
        name: stable, readable site name: the activation module's qualified name, or for a functional activation the
            producing layer's name plus the kind (``"fc1.relu"``).
        activation: what it computes.
        how: ``"module"``, ``"numeric"``, ``"behaviour"`` (modules), ``"function"`` / ``"method"`` (calls),
            ``"composite"`` (an element-wise sub-graph written in ``forward``, recognized as one function).
        module: the module to hook: the activation module itself; for a call, the module whose output is the
            call's input (``hook="input"``) or whose output is the call's output (``hook="output"``).
        module_name: qualified name of ``module``.
        hook: ``"module"``: watch the module's input and output; ``"input"``: apply the activation to the hooked
            module's output; ``"output"``: the hooked module's output is the activation's output.
        layout: the layout of the activation's input (dead units are counted along it).
        producer: the layer whose output feeds the activation, when there is one.
        input_std: std of the activation's input on the example input (first call; finite elements).
        saturation: fraction of those inputs where the activation is saturated (``|f'| < 1%`` of its max).
        calls: how many times an activation module (``hook="module"``) ran in the traced forward pass (a ResNet
            Bottleneck's one ``relu``: 3, the last after the residual add).
    """

    name: str
    activation: Activation
    how: str
    module: nn.Module
    module_name: str
    hook: SiteHook
    layout: Layout
    producer: str | None = None
    input_std: float = math.nan
    saturation: float = math.nan
    calls: int = 1


@dataclass
class AttentionSite:
    """One attention call: ``softmax`` of logits ``q·kᵀ`` (eager attention) or ``scaled_dot_product_attention``.

    Attributes:
        name: the row its figures are logged under: the qualified name of the module whose ``forward`` made the call
            (``"bert.encoder.layer.0.attention.self"``; ``""`` for the model itself), with ``":<n>"`` for the
            ``n``-th further attention call of the same module.
        module_name: qualified name of that module.
        how: ``"softmax"`` (logits computed in ``forward``, then a softmax), ``"sdpa"``, or ``"mha"`` (an
            ``nn.MultiheadAttention``, whose attention runs inside it: the site is the module itself).
        query: the layers the queries came from (``q_proj``; a packed ``c_attn``; ``nn.MultiheadAttention`` itself).
        key: the layers the keys came from.
        heads: query heads, where the call's shapes tell (``(B, H, T, D)``); ``None`` where heads are folded into the
            batch (``nn.MultiheadAttention``'s ``(B·H, T, D)``).
        kv_heads: key heads (fewer than ``heads`` under grouped-query attention), where the shapes tell.
        head_dim: the size of one query head (the last dimension of q).
        call: the index of this call among the module's attention calls in one forward pass.
    """

    name: str
    module_name: str
    how: Literal["softmax", "sdpa", "mha"]
    query: tuple[str, ...]
    key: tuple[str, ...]
    heads: int | None
    kv_heads: int | None
    head_dim: int
    call: int = 0


@dataclass
class ModelMap:
    """Everything one traced forward pass found (see :func:`lightning_bn.tracing.trace_model`).

    Attributes:
        layers: ``{name: LayerTrace}`` for every layer that ran, in execution order.
        sites: every activation that ran, module or call, in execution order.
        placeholders: qualified names of modules that return their input (``nn.Identity``, dropout, drop-path).
        unwatchable: activation calls no hook can see (input and output belong to no module), with the reason.
        forward_calls: model calls the trace made (always 1).
        order: qualified names of the modules in the order of their first call (forward order).
        attention: ``(query layer, key layer)`` pairs whose outputs meet in ``softmax(q·kᵀ)`` (or
            ``scaled_dot_product_attention``).
        attention_sites: every attention call, in execution order (:class:`AttentionSite`).
        functional: layers that were not called, but whose weight went into a torch function
            (``F.linear(x, self.qkv.weight)``: timm EVA/BEiT, torchvision Swin).
    """

    layers: dict[str, LayerTrace] = field(default_factory=dict)
    sites: list[ActivationSite] = field(default_factory=list)
    placeholders: list[str] = field(default_factory=list)
    unwatchable: list[tuple[str, str]] = field(default_factory=list)
    forward_calls: int = 1
    order: list[str] = field(default_factory=list)
    attention: list[tuple[str, str]] = field(default_factory=list)
    functional: list[str] = field(default_factory=list)
    attention_sites: list[AttentionSite] = field(default_factory=list)

    def site(self, name: str) -> ActivationSite:
        """The site called ``name``; ``KeyError`` naming the known ones otherwise."""
        for site in self.sites:
            if site.name == name:
                return site
        raise KeyError(f"Expected an activation site of the model but got {name!r}; known: {self.site_names}")

    @property
    def site_names(self) -> list[str]:
        return [s.name for s in self.sites]

    def final_layers(self) -> set[str]:
        """Layers whose output reaches the model output with no other layer in between."""
        return {n for n, t in self.layers.items() if t.final}

    def prefixed(self, prefix: str) -> ModelMap:
        """The map of a submodule, renamed as seen from its parent: ``prefix`` is the submodule's qualified name.

        Example::

            >>> import torch
            >>> from lightning_bn.tracing import trace_model
            >>> inner = nn.Sequential(nn.Linear(2, 4), nn.ReLU())
            >>> list(trace_model(inner, torch.randn(3, 2)).prefixed("encoder").layers)
            ['encoder.0']
        """

        def name(n: str | None) -> str | None:
            return None if n is None else f"{prefix}.{n}" if n else prefix

        layers = {
            name(n): replace(t, name=name(n), consumer=name(t.consumer), norm_after=name(t.norm_after),
                             residual_norm=name(t.residual_norm), gated_by=name(t.gated_by))
            for n, t in self.layers.items()
        }  # fmt: skip
        sites = [
            replace(s, name=name(s.name), module_name=name(s.module_name), producer=name(s.producer))
            for s in self.sites
        ]
        return ModelMap(layers, sites, [name(n) for n in self.placeholders],
                        [(name(n), why) for n, why in self.unwatchable], self.forward_calls,
                        [name(n) for n in self.order],
                        [(name(q), name(k)) for q, k in self.attention],
                        [name(n) for n in self.functional],
                        [replace(a, name=name(a.name), module_name=name(a.module_name),
                                 query=tuple(map(name, a.query)), key=tuple(map(name, a.key)))
                         for a in self.attention_sites])  # fmt: skip

    def merged(self, other: ModelMap) -> ModelMap:
        """This map and another one's layers, sites and placeholders (for parts of a model traced separately)."""
        return ModelMap(
            {**self.layers, **other.layers},
            self.sites + [s for s in other.sites if s.name not in set(self.site_names)],
            list(dict.fromkeys(self.placeholders + other.placeholders)),
            self.unwatchable + other.unwatchable,
            self.forward_calls + other.forward_calls,
            list(dict.fromkeys(self.order + other.order)),
            self.attention + [a for a in other.attention if a not in self.attention],
            list(dict.fromkeys(self.functional + other.functional)),
            self.attention_sites + [a for a in other.attention_sites if a.name not in
                                    {s.name for s in self.attention_sites}],  # fmt: skip
        )

    def __str__(self) -> str:
        """A table, one row per layer in execution order (``describe()`` has every site and detail), then one line
        counting the activations found and naming what no hook can see.

        Example::

            >>> import torch
            >>> from lightning_bn.tracing import trace_model
            >>> print(trace_model(nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 1)), torch.randn(3, 2)))
            layer  type    activation (how)   output shape  norm after  residual
            0      Linear  relu (module)      3x4           -           -
            2      Linear  identity (output)  3x1           -           -
            1 activation site(s); describe() lists them
        """
        header = ("layer", "type", "activation (how)", "output shape", "norm after", "residual")
        rows = [
            (
                name,
                type(t.module).__name__,
                f"{t.activation.describe()} ({t.how})",
                "x".join(map(str, t.output_shape)) or "scalar",
                t.norm_after or "-",
                "yes" if t.residual else "-",
            )
            for name, t in self.layers.items()
        ]
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *rows]]
        lines.append(f"{len(self.sites)} activation site(s); describe() lists them")
        if self.unwatchable:
            lines[-1] += f"; not watchable: {', '.join(name for name, _ in self.unwatchable)}"
        return "\n".join(lines)

    def describe(self) -> str:
        """One line per layer and per site: a readable dump for debugging a detection."""
        lines = [
            f"layer {n}: {type(t.module).__name__} {tuple(t.output_shape)} {t.layout} -> {t.activation.describe()} "
            f"({t.how}){' gate' if t.gate else ''}{f' gated by {t.gated_by}' if t.gated_by else ''}"
            for n, t in self.layers.items()
        ]
        lines += [f"site {s.name}: {s.activation.describe()} ({s.how}) via {s.hook} of {s.module_name!r}, {s.layout}"
                  for s in self.sites]  # fmt: skip
        lines += [f"placeholder {n}" for n in self.placeholders]
        lines += [f"unwatchable {n}: {why}" for n, why in self.unwatchable]
        return "\n".join(lines)
