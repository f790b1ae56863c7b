"""The attention probe: figures of the attention calls the trace found, and of the output logits, on logging steps.

Attached only on logging steps (like :class:`~lightning_bn.monitoring.activation.ActivationProbe`): a forward pre-hook
and a forward hook on each module that makes an attention call (``ModelMap.attention_sites``,
:func:`lightning_bn.tracing.trace_model`) and a :class:`~torch.overrides.TorchFunctionMode` for the step
see each ``softmax`` / ``scaled_dot_product_attention`` call, attributed to its site by the innermost running site
module and the call's index in it, and each ``cross_entropy`` call (its input: the output logits). On other steps
nothing is hooked and no mode is on.

Per attention site (one row per layer), from the pre-softmax logits ``z`` (the softmax input of eager attention,
masks and position bias included; ``q·kᵀ·scale`` plus ``attn_mask`` / ``is_causal`` for SDPA, keys repeated under
grouped-query attention; ``q`` and ``k`` from ``in_proj`` for ``nn.MultiheadAttention``, with its masks): masked
entries (``-inf``, or at most half the dtype's lowest value) are left out.

* ``attn_logit_max``: the largest logit; ``attn_logit_rms``: ``sqrt(mean z²)``;
* ``attn_entropy``: the mean entropy (nats) of the attention rows ``softmax(z)`` over batch, heads and queries
  (rows fully masked are skipped); ``attn_entropy_min``: the smallest per-head mean entropy.

Per model, where its loss is a cross-entropy: ``out_logit_max`` (the largest output logit) and ``out_log_z`` (the
mean ``logsumexp`` over classes, ``ignore_index`` targets left out), under the model's final layer.

Every row is sums and maxima only, so several calls (micro-batches, a module called twice) and processes (one
all-gather under DDP) combine exactly; the figures are computed on the host after the step's one transfer.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils.hooks import RemovableHandle

from lightning_bn.tags import ATTENTION_STATISTICS, OUTPUT_STATISTICS
from lightning_bn.tracing import HookSet
from lightning_bn.tracing.model_map import AttentionSite

__all__ = ["AttentionProbe", "attention_entry", "logit_summary"]

_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_MHA_ARGS = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask", "average_attn_weights",
             "is_causal")  # fmt: skip
_CE_ARGS = ("input", "target", "weight", "size_average", "ignore_index", "reduce", "reduction", "label_smoothing")


def _measuring() -> bool:
    """A training forward pass (gradients on), not a checkpointed segment's recomputation during backward."""
    return torch.is_grad_enabled() and torch._C._current_graph_task_id() == -1


def _bind(names: Sequence[str], args: tuple, kwargs: dict) -> dict[str, Any]:
    bound = dict(zip(names, args))
    bound.update(kwargs)
    return bound


def _floor(*dtypes: torch.dtype | None) -> float:
    """Logits at or below this are masked: half the lowest value of the narrowest float dtype involved."""
    lows = [torch.finfo(d).min for d in dtypes if d is not None and d.is_floating_point]
    return max(lows) / 2 if lows else torch.finfo(torch.float32).min / 2


def logit_summary(logits: Tensor, valid: Tensor | None, floor: float, heads: int) -> tuple[Tensor, Tensor]:
    """One call's row of attention logits ``(..., T, S)`` (keys last; heads at dim -3 when there are 4 dims or more):
    ``(sums, max)`` with ``sums = [count, Σz², per-head Σ entropy (heads), per-head rows (heads)]`` in float64.
    ``valid``: entries that take part (broadcast to ``logits``); entries ``<= floor`` (and ``-inf``, NaN) do not."""
    with torch.no_grad():
        z = logits.detach().float()
        if z.ndim < 2:
            z = z.reshape(1, -1)
        T, S = z.shape[-2:]
        seen = z.shape[-3] if z.ndim >= 4 else 1
        if z.ndim == 3 and heads > 1 and z.shape[0] % heads == 0:  # (B·H, T, S): heads folded into the batch
            seen = heads
        z = z.reshape(-1, seen, T, S)
        ok = z > floor
        if valid is not None:
            ok = ok & torch.broadcast_to(valid.to(z.device), logits.shape).reshape(z.shape)
        masked = torch.where(ok, z, -math.inf)
        count = ok.sum()
        squares = torch.where(ok, z * z, 0.0).sum(dtype=torch.float64)
        top = masked.amax() if masked.numel() else z.new_full((), -math.inf)
        rows = ok.any(-1)  # (B, heads, T)
        logp = torch.log_softmax(torch.where(rows.unsqueeze(-1), masked, 0.0), dim=-1)
        p = torch.where(ok, logp.exp(), 0.0)
        entropy = -torch.where(ok, p * logp, 0.0).sum(-1)
        per_head = torch.where(rows, entropy, 0.0).sum((0, 2), dtype=torch.float64)
        per_rows = rows.sum((0, 2)).double()
        if seen != heads:  # a call whose shapes disagree with the site's head count: head h counts as h % heads
            index = torch.arange(seen, device=z.device) % heads
            per_head = per_head.new_zeros(heads).index_add_(0, index, per_head)
            per_rows = per_rows.new_zeros(heads).index_add_(0, index, per_rows)
        sums = torch.cat([count.double().reshape(1), squares.reshape(1), per_head, per_rows])
        return sums, top.double()


def sdpa_logits(args: tuple, kwargs: dict) -> tuple[Tensor, Tensor | None, float] | None:
    """``(logits, valid, floor)`` of a ``scaled_dot_product_attention`` call: ``q·kᵀ·scale`` plus the float mask;
    ``valid`` from a boolean mask and ``is_causal`` (top-left aligned, as torch does); keys repeated when there are
    fewer key heads than query heads (grouped-query attention)."""
    call = _bind(_SDPA_ARGS, args, kwargs)
    q, k, mask = call.get("query"), call.get("key"), call.get("attn_mask")
    if not (isinstance(q, Tensor) and isinstance(k, Tensor)) or q.ndim < 2 or not q.is_floating_point():
        return None
    with torch.no_grad():
        qf, kf = q.detach().float(), k.detach().float()
        if qf.ndim >= 3 and kf.ndim >= 3 and kf.shape[-3] != qf.shape[-3] and qf.shape[-3] % kf.shape[-3] == 0:
            kf = kf.repeat_interleave(qf.shape[-3] // kf.shape[-3], dim=-3)
        scale = call.get("scale")
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
        logits = torch.matmul(qf, kf.transpose(-2, -1)) * scale
        L, S = logits.shape[-2:]
        valid = None
        if call.get("is_causal"):
            valid = torch.ones(L, S, dtype=torch.bool, device=logits.device).tril()
        mask_dtype = None
        if isinstance(mask, Tensor):
            if mask.dtype == torch.bool:
                valid = mask if valid is None else valid & mask
            else:
                logits = logits + mask.detach().float()
                mask_dtype = mask.dtype
        return logits, valid, _floor(q.dtype, mask_dtype)


def mha_logits(module: nn.MultiheadAttention, args: tuple, kwargs: dict) -> tuple[Tensor, Tensor | None, float] | None:
    """``(logits (B, H, L, S), valid, floor)`` of a call of ``nn.MultiheadAttention``: q and k from its input
    projection, scaled by ``1/√head_dim``; ``attn_mask`` and ``key_padding_mask`` (boolean: ``True`` is left out;
    float: added), ``is_causal`` without a mask, ``bias_k`` and ``add_zero_attn`` as the module applies them."""
    call = _bind(_MHA_ARGS, args, kwargs)
    query, key = call.get("query"), call.get("key")
    if not (isinstance(query, Tensor) and isinstance(key, Tensor)) or not query.is_floating_point():
        return None
    mask, padding = call.get("attn_mask"), call.get("key_padding_mask")
    with torch.no_grad():
        query, key = query.detach(), key.detach()
        if query.ndim == 2:  # unbatched
            query, key = query.unsqueeze(1), key.unsqueeze(1)
            padding = padding.unsqueeze(0) if isinstance(padding, Tensor) else padding
        elif module.batch_first:
            query, key = query.transpose(0, 1), key.transpose(0, 1)
        E, H, D = module.embed_dim, module.num_heads, module.head_dim
        if module._qkv_same_embed_dim:
            wq, wk = module.in_proj_weight[:E], module.in_proj_weight[E : 2 * E]
        else:
            wq, wk = module.q_proj_weight, module.k_proj_weight
        bias = module.in_proj_bias
        bq, bk = (bias[:E], bias[E : 2 * E]) if bias is not None else (None, None)
        q = F.linear(query.float(), wq.detach().float(), None if bq is None else bq.detach().float())
        k = F.linear(key.float(), wk.detach().float(), None if bk is None else bk.detach().float())
        L, B = q.shape[:2]
        extra = 0
        if module.bias_k is not None:
            k = torch.cat([k, module.bias_k.detach().float().repeat(1, B, 1)])
            extra += 1
        q = q.reshape(L, B, H, D).permute(1, 2, 0, 3)
        k = k.reshape(k.shape[0], B, H, D).permute(1, 2, 0, 3)
        if module.add_zero_attn:
            k = torch.cat([k, k.new_zeros(B, H, 1, D)], dim=2)
            extra += 1
        logits = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(D)
        S = logits.shape[-1]
        valid = torch.ones(B, H, L, S, dtype=torch.bool, device=logits.device)
        dtypes: list[torch.dtype] = [query.dtype]
        if isinstance(mask, Tensor):
            m = F.pad(mask.detach(), (0, extra)) if extra else mask.detach()
            m = m.reshape(1, 1, L, S) if m.ndim == 2 else m.reshape(B, H, L, S)
            if m.dtype == torch.bool:
                valid &= ~m
            else:
                logits = logits + m.float()
                dtypes.append(m.dtype)
        elif call.get("is_causal"):
            valid &= torch.ones(L, S, dtype=torch.bool, device=logits.device).tril()
        if isinstance(padding, Tensor):
            kp = F.pad(padding.detach(), (0, extra)) if extra else padding.detach()
            kp = kp.reshape(B, 1, 1, S)
            if kp.dtype == torch.bool:
                valid &= ~kp
            else:
                logits = logits + kp.float()
                dtypes.append(kp.dtype)
        return logits, valid, _floor(*dtypes)


def output_summary(args: tuple, kwargs: dict) -> tuple[Tensor, Tensor] | None:
    """``([rows, Σ logsumexp], max)`` (float64) of a ``cross_entropy`` call's input logits, classes along dim 1
    (dim 0 unbatched); rows whose class-index target is ``ignore_index`` are left out."""
    call = _bind(_CE_ARGS, args, kwargs)
    x, target = call.get("input"), call.get("target")
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.ndim == 0 or x.numel() == 0:
        return None
    with torch.no_grad():
        z = x.detach().float()
        dim = 1 if z.ndim >= 2 else 0
        lse, top = torch.logsumexp(z, dim), z.amax(dim)
        keep = torch.ones_like(lse, dtype=torch.bool)
        if isinstance(target, Tensor) and not target.is_floating_point() and target.shape == lse.shape:
            ignore = call.get("ignore_index", -100)
            keep = target.detach() != (-100 if ignore is None else ignore)
        sums = torch.stack([keep.sum().double(), torch.where(keep, lse, 0.0).sum(dtype=torch.float64)])
        return sums, torch.where(keep, top, -math.inf).amax().double()


def _logits_of(kind: str, args: tuple, kwargs: dict) -> tuple[Tensor, Tensor | None, float] | None:
    """``(logits with keys last, valid, floor)`` of a ``softmax`` call (its input) or an SDPA call."""
    if kind == "scaled_dot_product_attention":
        return sdpa_logits(args, kwargs)
    call = _bind(("input", "dim"), args, kwargs)
    x, dim = call.get("input"), call.get("dim")
    if not isinstance(x, Tensor) or not x.is_floating_point():
        return None
    if dim is not None and x.ndim and dim % x.ndim != x.ndim - 1:
        x = x.movedim(dim, -1)
    return x, None, _floor(x.dtype)


def attention_entry(site: AttentionSite, name: str, module: nn.Module) -> dict[str, Any]:
    """The layers-table row of an attention site.

    Example::

        >>> site = AttentionSite("attn", "attn", "softmax", ("attn.q",), ("attn.k",), 4, 4, 16)
        >>> attention_entry(site, "attn", nn.Identity())
        {'name': 'attn', 'module_type': 'Identity', 'activation': None, 'hook': 'attention', 'heads': 4}
    """
    return {"name": name, "module_type": type(module).__name__, "activation": None, "hook": "attention",
            "heads": site.heads or 1}  # fmt: skip


@dataclass
class _Site:
    spec: AttentionSite
    name: str
    module: nn.Module
    heads: int
    sums: Tensor | None = None
    top: Tensor | None = None

    @property
    def width(self) -> int:
        return 2 + 2 * self.heads

    def fold(self, found: tuple[Tensor, Tensor]) -> None:
        sums, top = found
        self.sums = sums if self.sums is None else self.sums + sums
        self.top = top if self.top is None else torch.maximum(self.top, top)


class _Capture(TorchFunctionMode):
    """Sees ``softmax``, ``scaled_dot_product_attention`` and ``cross_entropy`` calls; lets every call through."""

    lightning_bn_capture = True  # the monitors' own reductions step out of it (activation.outside_capture)

    def __init__(self, probe: AttentionProbe) -> None:
        super().__init__()
        self.probe = probe

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", None)
        if name in ("softmax", "scaled_dot_product_attention", "cross_entropy"):
            self.probe._seen(name, args, kwargs)
        return func(*args, **kwargs)


class AttentionProbe(HookSet):
    """Attention figures of the sites of a traced model, and the output logits of a cross-entropy loss, on the
    steps it is attached for (see the module's docstring).

    Args:
        sites: ``(site, row name, module)`` triples (``ModelMap.attention_sites`` resolved on the model).
        output: the name of the output-logit row (the model's final layer, or ``"output"``); ``None``: no
            output-logit figures.

    Example::

        >>> from lightning_bn.tracing import trace_model
        >>> class Attn(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.q, self.k = nn.Linear(8, 8), nn.Linear(8, 8)
        ...     def forward(self, x):
        ...         q, k = (f(x).unflatten(-1, (2, 4)).transpose(1, 2) for f in (self.q, self.k))
        ...         return (q @ k.transpose(-2, -1)).softmax(-1).sum()
        >>> net = Attn()
        >>> found = trace_model(net, torch.randn(2, 5, 8))
        >>> probe = AttentionProbe.of_map(net, found)
        >>> with probe:
        ...     _ = net(torch.randn(2, 5, 8))
        >>> sorted(probe.collect())
        ['attn_entropy/', 'attn_entropy_min/', 'attn_logit_max/', 'attn_logit_rms/']
    """

    def __init__(
        self,
        sites: Sequence[tuple[AttentionSite, str, nn.Module]],
        output: str | None = "output",
        output_module: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self._output_module = output_module  # its forward starts the mode when there is no site to start it
        self._sites = [_Site(spec, name, module, max(spec.heads or 1, 1)) for spec, name, module in sites]
        self._by_call = {(s.spec.module_name, s.spec.call): s for s in self._sites if s.spec.how != "mha"}
        self._mha = {s.spec.module_name: s for s in self._sites if s.spec.how == "mha"}
        self._frames: list[list[Any]] = []  # running site modules: [module name, attention calls so far, opaque]
        self._loose: dict[tuple[int, int, str], _Site] | None = None  # of a first call traced: see first_call
        self.output = output
        self._out_sums: Tensor | None = None
        self._out_top: Tensor | None = None
        self._mode: _Capture | None = None
        self._armed = False  # attached for a step: the mode starts with the first forward of a site (or the output)
        modules: dict[int, tuple[nn.Module, str]] = {}
        for s in self._sites:
            modules.setdefault(id(s.module), (s.module, s.spec.module_name))
        self._modules = list(modules.values())
        self._hooks = [(torch.compiler.disable(self._enter(name)), torch.compiler.disable(self._leave))
                       for _, name in self._modules]  # fmt: skip

    @classmethod
    def of_map(
        cls, model: nn.Module, found: Any, plain: Callable[[str], str] = str, output: bool = True
    ) -> AttentionProbe:
        """The probe of ``found``'s attention sites on ``model`` (names passed through ``plain``), with the output
        logits named after the model's final layer (the last in forward order of ``found.final_layers()``)."""
        named = dict(model.named_modules())
        sites = []
        for spec in getattr(found, "attention_sites", None) or []:
            module = named.get(spec.module_name)
            if module is not None:
                sites.append((spec, plain(spec.name), module))
        final, final_module = "output", None
        if found is not None:
            finals = found.final_layers()
            ordered = [n for n in found.order if n in finals]
            if ordered:
                final, final_module = plain(ordered[-1]) or "output", named.get(ordered[-1])
        return cls(sites, final if output else None, final_module)

    @property
    def sites(self) -> list[tuple[AttentionSite, str, nn.Module]]:
        return [(s.spec, s.name, s.module) for s in self._sites]

    def entries(self) -> list[tuple[AttentionSite, dict[str, Any]]]:
        """The layers-table rows of the sites, with their specs."""
        return [(s.spec, attention_entry(s.spec, s.name, s.module)) for s in self._sites]

    # -------------------------------------------------------------------------------------------------- hooks
    def reset(self) -> None:
        """Drop what the current step measured so far (:meth:`gather` does too)."""
        for site in self._sites:
            site.sums = site.top = None
        self._out_sums = self._out_top = None
        self._loose = None

    def _register(self) -> Iterator[RemovableHandle]:
        self._frames = []
        for (module, _), (enter, leave) in zip(self._modules, self._hooks):
            yield module.register_forward_pre_hook(enter, with_kwargs=True)
            yield module.register_forward_hook(leave, always_call=True)
        if self._output_module is not None and self.output is not None:
            yield self._output_module.register_forward_pre_hook(torch.compiler.disable(self.start))

    @property
    def attached(self) -> bool:
        return bool(self._handles) or self._mode is not None

    def attach(self) -> None:
        """Hooks on for the step; the mode is pushed by the first forward of a site module or the output layer (a
        probe attached for a step that never runs the model leaves no mode behind), and leaves at :meth:`pause` or
        :meth:`detach`."""
        if self.attached:
            return
        super().attach()
        self._armed = bool(self._by_call or self.output is not None)

    def start(self, *_: Any) -> None:
        """Push the mode (attached, not paused, not yet on): the model's forward has started (also a forward pre-hook
        of the output layer)."""
        if self._armed and self._mode is None:
            self._mode = _Capture(self)
            self._mode.__enter__()

    @property
    def capturing(self) -> bool:
        """Whether the mode is on (the model ran on this attached step)."""
        return self._mode is not None

    def detach(self) -> None:
        super().detach()
        self._frames = []
        self.pause()

    def pause(self) -> None:
        """Stop seeing torch calls for the rest of the step (the forward passes and the loss are done: the engine's
        own measurement and the optimizer step need not run through the mode); the rows taken so far are kept."""
        self._armed = False
        mode, self._mode = self._mode, None
        if mode is None:
            return
        from torch.overrides import _get_current_function_mode_stack, _pop_mode, _push_mode

        stack = _get_current_function_mode_stack()
        if mode not in stack:
            return
        above = []
        while True:  # modes entered after ours (and not left) go back on once ours is off
            top = _pop_mode()
            if top is mode:
                break
            above.append(top)
        for other in reversed(above):
            _push_mode(other)

    def _enter(self, name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            self.start()
            mha = self._mha.get(name)
            self._frames.append([name, 0, mha is not None])
            if mha is not None and _measuring():
                found = mha_logits(module, args, kwargs)
                if found is not None:
                    logits, valid, floor = found
                    mha.fold(logit_summary(logits, valid, floor, mha.heads))

        return hook

    def _leave(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self._frames:
            self._frames.pop()

    def _seen(self, kind: str, args: tuple, kwargs: dict) -> None:
        """A watched call under the mode: attributed to the innermost running site module and its call index."""
        if kind == "cross_entropy":
            if self.output is not None and _measuring():
                found = output_summary(args, kwargs)
                if found is not None:
                    sums, top = found
                    self._out_sums = sums if self._out_sums is None else self._out_sums + sums
                    self._out_top = top if self._out_top is None else torch.maximum(self._out_top, top)
            return
        if not self._frames or self._frames[-1][2]:
            return
        frame = self._frames[-1]
        index, frame[1] = frame[1], frame[1] + 1
        if not _measuring():
            return
        if self._loose is not None and isinstance(frame[0], int):  # a first call traced: any module's call
            found = _logits_of(kind, args, kwargs)
            if found is not None:
                logits, valid, floor = found
                heads = logits.shape[-3] if logits.ndim >= 4 else 1
                key = (frame[0], index, "softmax" if kind == "softmax" else "sdpa")
                self._loose.setdefault(key, _Site(None, "", None, heads)).fold(  # type: ignore[arg-type]
                    logit_summary(logits, valid, floor, heads)
                )
            return
        site = self._by_call.get((frame[0], index))
        if site is None:
            return
        if (kind == "softmax") == (site.spec.how == "softmax"):
            found = _logits_of(kind, args, kwargs)
            if found is not None:
                logits, valid, floor = found
                site.fold(logit_summary(logits, valid, floor, site.heads))

    @contextlib.contextmanager
    def first_call(self, model: nn.Module) -> Iterator[None]:
        """While the first call of ``model`` is traced on a logging step (its attention sites not known yet): every
        ``softmax`` / SDPA call is summarized by the innermost running module of ``model`` (hooks on all of them, for
        this one call), every ``nn.MultiheadAttention`` call too; the probe built from the trace :meth:`adopt` s the
        rows of its sites."""
        self.start()  # the model runs now
        if self._mode is None:
            yield
            return
        self._loose = {}
        handles = []

        def pre(module: nn.Module, args: tuple, kwargs: dict) -> None:
            mha = isinstance(module, nn.MultiheadAttention)
            self._frames.append([id(module), 0, mha])
            if mha and _measuring():
                with torch._C.DisableTorchFunction():  # out of the live trace
                    found = mha_logits(module, args, kwargs)
                    if found is not None:
                        logits, valid, floor = found
                        heads = logits.shape[1]
                        site = self._loose.setdefault((id(module), 0, "mha"), _Site(None, "", module, heads))
                        site.fold(logit_summary(logits, valid, floor, heads))

        try:
            for module in model.modules():
                if isinstance(module, torch.jit.ScriptModule):  # no hook goes on a ScriptModule
                    continue
                handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
                handles.append(module.register_forward_hook(self._leave, always_call=True))
            yield
        finally:
            for handle in handles:
                handle.remove()

    def adopt(self, other: AttentionProbe) -> None:
        """Take over what ``other`` measured so far: its output-logit rows and, of a first call it traced
        (:meth:`first_call`), the rows of this probe's sites."""
        loose = other._loose or {}
        known = {s.name: s for s in other._sites if s.sums is not None}
        for site in self._sites:
            found = known.get(site.name) or loose.get((id(site.module), site.spec.call, site.spec.how))
            if found is not None and found.heads == site.heads and site.sums is None:
                site.sums, site.top = found.sums, found.top
        if self._out_sums is None:
            self._out_sums, self._out_top = other._out_sums, other._out_top
        other._loose = None

    # ------------------------------------------------------------------------------------------------ results
    def gather(self, distributed: bool = True) -> tuple[Tensor, Callable[[list[float]], dict[str, float]]]:
        """The step's rows as one float64 vector on the device (``[sums of every site, output sums, maxima]``),
        combined across processes (one all-gather: sums added, maxima taken, identically on every rank), and the
        function that turns its host copy into figures (``{"attn_entropy/<site>": value, ...}``). Resets."""
        device = next((t.device for t in [*(s.sums for s in self._sites), self._out_sums] if t is not None),
                      torch.device("cpu"))  # fmt: skip
        parts = [s.sums if s.sums is not None else torch.zeros(s.width, dtype=torch.float64, device=device)
                 for s in self._sites]  # fmt: skip
        parts.append(
            self._out_sums if self._out_sums is not None else torch.zeros(2, dtype=torch.float64, device=device)
        )
        tops = [s.top if s.top is not None else torch.tensor(-math.inf, dtype=torch.float64, device=device)
                for s in self._sites]  # fmt: skip
        tops.append(
            self._out_top if self._out_top is not None else torch.tensor(-math.inf, dtype=torch.float64, device=device)
        )
        sums = torch.cat([p.to(device) for p in parts])
        maxima = torch.stack([t.to(device) for t in tops])
        dist = torch.distributed
        if distributed and dist.is_available() and dist.is_initialized():
            local = torch.cat([sums, maxima])
            gathered = [torch.empty_like(local) for _ in range(dist.get_world_size())]
            dist.all_gather(gathered, local.contiguous())
            stacked = torch.stack(gathered)
            sums, maxima = stacked[:, : sums.numel()].sum(0), stacked[:, sums.numel() :].amax(0)
        layout = [(s.name, s.heads) for s in self._sites]
        output = self.output
        for site in self._sites:
            site.sums = site.top = None
        self._out_sums = self._out_top = None
        size = sums.numel()

        def parse(host: list[float]) -> dict[str, float]:
            metrics: dict[str, float] = {}
            offset = 0
            for i, (name, heads) in enumerate(layout):
                row = host[offset : offset + 2 + 2 * heads]
                offset += 2 + 2 * heads
                count, squares = row[0], row[1]
                if count <= 0:
                    continue  # the site did not run (or every logit was masked)
                metrics[f"{ATTENTION_STATISTICS['logit_max']}/{name}"] = host[size + i]
                metrics[f"{ATTENTION_STATISTICS['logit_rms']}/{name}"] = math.sqrt(squares / count)
                entropy, rows = row[2 : 2 + heads], row[2 + heads :]
                if sum(rows) > 0:
                    metrics[f"{ATTENTION_STATISTICS['entropy']}/{name}"] = sum(entropy) / sum(rows)
                    metrics[f"{ATTENTION_STATISTICS['entropy_min']}/{name}"] = min(
                        e / r for e, r in zip(entropy, rows) if r > 0
                    )
            rows, total = host[offset], host[offset + 1]
            if output is not None and rows > 0:
                metrics[f"{OUTPUT_STATISTICS['logit_max']}/{output}"] = host[size + len(layout)]
                metrics[f"{OUTPUT_STATISTICS['log_z']}/{output}"] = total / rows
            return metrics

        return torch.cat([sums, maxima]), parse

    def collect(self, distributed: bool = True) -> dict[str, float]:
        """:meth:`gather`, then one device-to-host transfer."""
        self.detach()
        payload, parse = self.gather(distributed)
        return parse(payload.cpu().tolist())
