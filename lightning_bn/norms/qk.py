"""QK-norm: a LayerNorm (or RMSNorm) over the head dimension on the queries and keys of every attention the trace finds.

Normalizing ``q`` and ``k`` per head before ``q·kᵀ`` (ViT-22B, Dehghani et al. 2023; OLMo-2; Qwen3's ``q_norm`` /
``k_norm``) bounds the attention logits: their scale no longer follows the norms of ``W_q`` / ``W_k``, which removes
the logit growth that makes large-model training diverge.

:func:`insert_qk_norm` traces the model (:func:`lightning_bn.tracing.trace_model`), and per attention site:

- separate query / key projections (``q_proj`` / ``k_proj``, BERT's ``query`` / ``key``, T5's ``q`` / ``k``): a
  :class:`QKNorm` is registered as the child ``qk_norm`` of the projection and applied to its output by a forward hook;
- a packed projection (GPT-2's ``c_attn`` Conv1D, timm's ``qkv`` Linear, output ``[q | k | v]``): the same, normalizing
  only the q and k slices, v untouched;
- ``nn.MultiheadAttention``: the module's class becomes :class:`QKNormMultiheadAttention`, which computes the same
  projections with the same parameters, normalizes q and k per head, and attends with the same semantics.

Existing ``state_dict`` keys are unchanged; the only new keys are the norms' (``...q_proj.qk_norm.q.weight``,
``...c_attn.qk_norm.k.bias``, ``...self_attn.qk_norm.q.weight``), listed in :attr:`QKNormReport.added_keys`, so an old
state dict loads with ``strict=False`` (the norms keep their identity init).

Before anything is changed, the layout of every projection's output is confirmed on one probe forward pass: the
projection's output is replaced by a known pattern and the pattern is looked for in the q and k reaching the attention
call (``scaled_dot_product_attention`` or the ``q @ kᵀ`` matmul). A site whose layout cannot be confirmed (heads
interleaved in a packed output, a rotary embedding written in place, a projection that is not a Linear / Conv1D) is
skipped with the reason; an error leaves the model untouched.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from lightning_bn import checks
from lightning_bn.norms.insert import _check_exclude, _excluded
from lightning_bn.tracing import as_call

__all__ = [
    "QK_NORM_KINDS",
    "QKNorm",
    "QKNormMultiheadAttention",
    "QKNormPlan",
    "QKNormReport",
    "QKNormSite",
    "insert_qk_norm",
    "plan_qk_norm",
]

#: The norms :func:`insert_qk_norm` puts over the head dimension.
QK_NORM_KINDS = ("layer", "rms")


def _head_norm(kind: str, head_dim: int, eps: float, like: Tensor | None) -> nn.Module:
    factory = {} if like is None else {"device": like.device, "dtype": like.dtype}
    if kind == "layer":
        return nn.LayerNorm(head_dim, eps=eps, **factory)
    return nn.RMSNorm(head_dim, eps=eps, **factory)


class QKNorm(nn.Module):
    """Normalize the query and / or key slices of a projection's output per head, over the head dimension.

    ``q`` / ``k``: the norms (``nn.LayerNorm(head_dim)`` or ``nn.RMSNorm(head_dim)``, shared across heads), ``None``
    where this projection does not give that role. The q slice is ``[q_offset, q_offset + heads·head_dim)`` of the last
    dimension, the k slice ``[k_offset, k_offset + kv_heads·head_dim)``; the rest (v of a packed projection) passes.

    Example::

        >>> norm = QKNorm(head_dim=4, q=(0, 2), k=(8, 2), kind="layer")  # packed [q | k | v], 2 heads of 4
        >>> y = norm(torch.randn(3, 5, 24))
        >>> y[..., :4].mean(-1).abs().max() < 1e-5, y.shape
        (tensor(True), torch.Size([3, 5, 24]))
    """

    def __init__(
        self,
        head_dim: int,
        q: tuple[int, int] | None = None,
        k: tuple[int, int] | None = None,
        kind: str = "layer",
        eps: float = 1e-6,
        like: Tensor | None = None,
    ) -> None:
        super().__init__()
        self.head_dim, self.kind = head_dim, kind
        self.q_slice, self.k_slice = q, k
        self.q = _head_norm(kind, head_dim, eps, like) if q is not None else None
        self.k = _head_norm(kind, head_dim, eps, like) if k is not None else None

    def forward(self, x: Tensor) -> Tensor:
        parts = [(s[0], s[1], n) for s, n in ((self.q_slice, self.q), (self.k_slice, self.k)) if s is not None]
        pieces, at = [], 0
        for offset, heads, norm in sorted(parts, key=lambda p: p[0]):
            width = heads * self.head_dim
            if offset > at:
                pieces.append(x[..., at:offset])
            pieces.append(norm(x[..., offset : offset + width].unflatten(-1, (heads, self.head_dim))).flatten(-2))
            at = offset + width
        if at < x.shape[-1]:
            pieces.append(x[..., at:])
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=-1)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, q={self.q_slice}, k={self.k_slice}"


def _apply_qk_norm(module: nn.Module, args: Any, output: Tensor) -> Tensor:
    """The forward hook that applies ``module.qk_norm`` to the projection's output (module-level: picklable)."""
    return module.qk_norm(output)


def _no_fast_path(module: nn.Module, args: Any) -> None:
    """A no-op forward pre-hook: ``nn.TransformerEncoderLayer`` takes its fused eval fast path (which reads
    ``in_proj_weight`` and would skip the QK-norm) only when no submodule has hooks."""
    return None


class QKNormMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` with q and k normalized per head (``self.qk_norm.q`` / ``.k``) before ``q·kᵀ``.

    Made from an existing module by :func:`insert_qk_norm` (its class is swapped: same parameters, same
    ``state_dict`` keys, plus ``qk_norm.*``). The forward computes the in-projections with the same weights and attends
    with the semantics of ``nn.MultiheadAttention`` (``batch_first``, unbatched input, ``attn_mask``,
    ``key_padding_mask``, ``need_weights``, ``average_attn_weights``, ``is_causal``, dropout); ``bias_k`` / ``bias_v``
    and ``add_zero_attn`` are refused at insertion. No fused fast path.
    """

    qk_norm: QKNorm

    def forward(  # type: ignore[override]
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        batched = query.dim() == 3
        if self.batch_first and batched:
            query, key, value = (x.transpose(0, 1) for x in (query, key, value))
        if not batched:
            query, key, value = (x.unsqueeze(1) for x in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        tgt_len, bsz, embed = query.shape
        src_len = key.shape[0]
        heads, hd = self.num_heads, self.head_dim
        if self._qkv_same_embed_dim:
            w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        else:
            w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        b_q, b_k, b_v = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None, None, None)
        q = F.linear(query, w_q, b_q).view(tgt_len, bsz, heads, hd).permute(1, 2, 0, 3)
        k = F.linear(key, w_k, b_k).view(src_len, bsz, heads, hd).permute(1, 2, 0, 3)
        v = F.linear(value, w_v, b_v).view(src_len, bsz, heads, hd).permute(1, 2, 0, 3)
        q = self.qk_norm.q(q) if self.qk_norm.q is not None else q
        k = self.qk_norm.k(k) if self.qk_norm.k is not None else k

        key_padding_mask = F._canonical_mask(
            mask=key_padding_mask, mask_name="key_padding_mask", other_type=F._none_or_dtype(attn_mask),
            other_name="attn_mask", target_type=q.dtype,
        )  # fmt: skip
        attn_mask = F._canonical_mask(
            mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="", target_type=q.dtype,
            check_other=False,
        )  # fmt: skip
        if is_causal and attn_mask is None:
            raise RuntimeError(
                "Need attn_mask if specifying the is_causal hint. You may use the Transformer module method "
                "`generate_square_subsequent_mask` to create this mask."
            )
        if is_causal and key_padding_mask is None and not need_weights:
            attn_mask = None  # the hint alone: scaled_dot_product_attention builds the causal mask
        else:
            is_causal = False
        if attn_mask is not None:
            attn_mask = (
                attn_mask.view(1, 1, tgt_len, src_len)
                if attn_mask.dim() == 2
                else attn_mask.view(bsz, heads, tgt_len, src_len)
            )
        if key_padding_mask is not None:
            padding = key_padding_mask.view(bsz, 1, 1, src_len)
            attn_mask = padding if attn_mask is None else attn_mask + padding
        dropout_p = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = (q * (1.0 / math.sqrt(hd))) @ k.transpose(-2, -1)
            if attn_mask is not None:
                scores = scores + attn_mask
            weights = torch.softmax(scores, dim=-1)
            if dropout_p > 0.0:
                weights = F.dropout(weights, p=dropout_p)
            out = weights @ v
            if average_attn_weights:
                weights = weights.mean(dim=1)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal)
        out = out.permute(2, 0, 1, 3).reshape(tgt_len * bsz, embed)
        out = F.linear(out, self.out_proj.weight, self.out_proj.bias).view(tgt_len, bsz, embed)
        if not batched:
            out = out.squeeze(1)
            weights = weights.squeeze(0) if weights is not None else None
        elif self.batch_first:
            out = out.transpose(0, 1)
        return out, weights


@dataclass
class QKNormSite:
    """One attention whose queries and keys were normalized: where, with what, and the ``state_dict`` keys added."""

    attention: str
    query: str
    key: str
    heads: int
    kv_heads: int
    head_dim: int
    norm: str
    packed: bool = False
    added_keys: list[str] = field(default_factory=list)


@dataclass
class QKNormReport:
    """What :func:`insert_qk_norm` did: the sites normalized, those skipped with the reason, and the keys added.

    No existing ``state_dict`` key is renamed or removed: ``model.load_state_dict(old, strict=False)`` loads every old
    key, and the missing keys are exactly ``added_keys``.
    """

    sites: list[QKNormSite] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    added_keys: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "sites": [asdict(s) for s in self.sites],
            "skipped": [{"layer": n, "reason": r} for n, r in self.skipped],
            "added_keys": list(self.added_keys),
        }

    def lines(self) -> list[str]:
        out = [
            f"qk-norm {s.attention or '(model)'}: {s.norm} over head_dim {s.head_dim} on query {s.query} "
            f"({s.heads} heads) and key {s.key} ({s.kv_heads} heads){' (packed)' if s.packed else ''}"
            for s in self.sites
        ]
        out += [f"skipped {n}: {r}" for n, r in self.skipped]
        out += [f"added key {k}" for k in self.added_keys]
        return out

    def __str__(self) -> str:
        return "\n".join(self.lines())


@dataclass
class _Candidate:
    site: Any  # AttentionSite
    query: str
    key: str
    heads: int
    kv_heads: int
    head_dim: int
    q_offset: int = 0
    k_offset: int = 0
    packed: bool = False
    confirmed: bool = False


@dataclass
class QKNormPlan:
    """QK-norms built for every site, checked, not yet in the model: :meth:`apply` puts them in, all or nothing."""

    kind: str
    eps: float
    candidates: list[_Candidate] = field(default_factory=list)
    mha: list[tuple[str, int]] = field(default_factory=list)  # (name, heads)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def apply(self, model: nn.Module) -> QKNormReport:
        """Insert the norms; on failure the module tree and ``state_dict`` are restored."""
        before = set(model.state_dict())
        modules = dict(model.named_modules())
        norm_name = "LayerNorm" if self.kind == "layer" else "RMSNorm"
        report = QKNormReport(skipped=list(self.skipped))
        changed: list[tuple[nn.Module, Any]] = []  # (module, undo)
        try:
            roles: dict[str, dict[str, tuple[int, int]]] = {}
            dims: dict[str, int] = {}
            for c in self.candidates:
                roles.setdefault(c.query, {})["q"] = (c.q_offset, c.heads)
                # a slice feeding both q and k (shared q/k) gets one norm
                if (c.k_offset, c.kv_heads) != roles.get(c.key, {}).get("q"):
                    roles.setdefault(c.key, {}).setdefault("k", (c.k_offset, c.kv_heads))
                dims[c.query] = dims[c.key] = c.head_dim
            for layer, role in roles.items():
                module = modules[layer]
                module.qk_norm = QKNorm(dims[layer], role.get("q"), role.get("k"), self.kind, self.eps, module.weight)
                handle = module.register_forward_hook(_apply_qk_norm)
                changed.append((module, handle))
            for name, heads in self.mha:
                module = modules[name]
                like = module.in_proj_weight if module.in_proj_weight is not None else module.q_proj_weight
                module.qk_norm = QKNorm(module.head_dim, (0, heads), (0, heads), self.kind, self.eps, like)
                old_class = module.__class__
                module.__class__ = _mha_class(old_class)
                handle = module.register_forward_pre_hook(_no_fast_path)
                changed.append((module, (handle, old_class)))
                for parent in modules.values():  # a TransformerEncoder would feed its layers nested tensors
                    if isinstance(parent, nn.TransformerEncoder) and any(m is module for m in parent.modules()):
                        parent.use_nested_tensor = False
        except BaseException:
            for module, undo in changed:
                handle, old_class = undo if isinstance(undo, tuple) else (undo, None)
                handle.remove()
                if old_class is not None:
                    module.__class__ = old_class
                if "qk_norm" in module._modules:
                    del module._modules["qk_norm"]
            raise
        after = list(model.state_dict())
        report.added_keys = [k for k in after if k not in before]
        for c in self.candidates:
            prefixes = (
                {f"{c.query}.qk_norm.q.", f"{c.key}.qk_norm.k.", f"{c.key}.qk_norm.q."}
                if c.query == c.key
                else {f"{c.query}.qk_norm.q.", f"{c.key}.qk_norm.k."}
            )
            keys = [k for k in report.added_keys if any(k.startswith(p) for p in prefixes)]
            report.sites.append(
                QKNormSite(c.site.name, c.query, c.key, c.heads, c.kv_heads, c.head_dim, norm_name, c.packed, keys)
            )
        for name, heads in self.mha:
            hd = modules[name].head_dim
            keys = [k for k in report.added_keys if k.startswith(f"{name}.qk_norm.")]
            packed = bool(modules[name]._qkv_same_embed_dim)
            report.sites.append(QKNormSite(name, name, name, heads, heads, hd, norm_name, packed, keys))
        return report


_MHA_CLASSES: dict[type, type] = {}


def _mha_class(cls: type) -> type:
    """``QKNormMultiheadAttention`` itself for a plain ``nn.MultiheadAttention``; a subclass of both otherwise."""
    if cls is nn.MultiheadAttention:
        return QKNormMultiheadAttention
    if cls not in _MHA_CLASSES:
        _MHA_CLASSES[cls] = type(f"QKNorm{cls.__name__}", (QKNormMultiheadAttention, cls), {})
    return _MHA_CLASSES[cls]


def _out_features(module: nn.Module) -> int | None:
    """The output width of a Linear or a transformers ``Conv1D`` (weight ``(in, out)``, ``nf`` = out)."""
    if isinstance(module, nn.Linear):
        return module.out_features
    if type(module).__name__ == "Conv1D" and isinstance(getattr(module, "nf", None), int):
        return module.nf
    return None


def _heads_from_module(module: nn.Module) -> int | None:
    for attr in ("num_heads", "num_attention_heads", "n_head", "n_heads", "heads"):
        value = getattr(module, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    config = getattr(module, "config", None)
    for attr in ("num_attention_heads", "n_head", "num_heads"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _check_arguments(kind: Any, eps: Any, exclude: Any) -> list[str]:
    checks.choice("kind", kind, QK_NORM_KINDS)
    checks.number("eps", eps)
    return _check_exclude(exclude)


def plan_qk_norm(
    model: nn.Module,
    example_input: Any,
    kind: str = "layer",
    eps: float = 1e-6,
    exclude: Sequence[str] | None = None,
    *,
    model_map: Any = None,
) -> QKNormPlan:
    """Find every attention, check it can take a QK-norm, and confirm the q / k layouts; nothing is changed.

    Runs the trace (unless ``model_map`` from :func:`~lightning_bn.tracing.trace_model` is given) and one probe forward
    pass. Raises ``ValueError`` for a bad argument, a model with no attention, or one where no attention can take a
    QK-norm (the reasons named).
    """
    from lightning_bn.tracing import trace_model

    if not isinstance(model, nn.Module):
        raise TypeError(f"Expected `model` to be an nn.Module but got {model!r}")
    patterns = _check_arguments(kind, eps, exclude)
    if model_map is None:
        model_map = trace_model(model, example_input)
    modules = dict(model.named_modules())
    plan = QKNormPlan(kind, float(eps))
    if not model_map.attention_sites:
        raise ValueError(
            f"Found no attention in {type(model).__name__} on the example input: QK-norm needs a softmax(q·kᵀ), a "
            "scaled_dot_product_attention call or an nn.MultiheadAttention that runs"
        )
    seen: set[tuple[str, str]] = set()
    for site in model_map.attention_sites:
        refuse = _refusal(site, modules, model_map, patterns)
        if site.how == "mha":
            if refuse is None and (site.module_name, "mha") not in seen:
                plan.mha.append((site.module_name, modules[site.module_name].num_heads))
            if refuse is not None and refuse[0] not in {n for n, _ in plan.skipped}:
                plan.skipped.append(refuse)
            seen.add((site.module_name, "mha"))
            continue
        if refuse is not None:
            if refuse[0] not in {n for n, _ in plan.skipped}:
                plan.skipped.append(refuse)
            continue
        candidate = _candidate(site, modules)
        if isinstance(candidate, tuple):
            plan.skipped.append(candidate)
            continue
        if (candidate.query, candidate.key) in seen:
            continue
        seen.add((candidate.query, candidate.key))
        plan.candidates.append(candidate)
    if plan.candidates:
        failure = _probe(model, example_input, plan.candidates)
        for c in plan.candidates:
            if not c.confirmed:
                how = f" ({failure})" if failure else ""
                plan.skipped.append(
                    (c.site.name, f"could not confirm that {c.query} / {c.key} give q and k as (heads={c.heads}, "
                     f"head_dim={c.head_dim}) slices at offsets {c.q_offset} / {c.k_offset} of their output{how}: "
                     "heads interleaved, a different packing order, or q / k changed before the attention")
                )  # fmt: skip
        plan.candidates = [c for c in plan.candidates if c.confirmed]
    if not plan.candidates and not plan.mha and not all(r.startswith("already normalized") for _, r in plan.skipped):
        reasons = "; ".join(f"{n or '(model)'}: {r}" for n, r in plan.skipped)
        raise ValueError(f"Cannot insert a QK-norm into any attention of {type(model).__name__}: {reasons}")
    return plan


def _refusal(site: Any, modules: dict[str, nn.Module], model_map: Any, patterns: list[str]) -> tuple[str, str] | None:
    names = (site.name, site.module_name, *site.query, *site.key)
    if _excluded(names, patterns):
        return site.name, "excluded"
    if site.how == "mha":
        module = modules[site.module_name]
        if isinstance(module, QKNormMultiheadAttention):
            return site.name, "already normalized (QK-norm inserted)"
        if not isinstance(module, nn.MultiheadAttention):
            return site.name, f"an attention inside {type(module).__name__}, not an nn.MultiheadAttention"
        if module.bias_k is not None or module.add_zero_attn:
            return (
                site.name,
                "nn.MultiheadAttention with bias_k / bias_v or add_zero_attn: the extra key is no projection",
            )
        return None
    if len(site.query) != 1 or len(site.key) != 1:
        return (
            site.name,
            f"q or k come from several layers ({list(site.query)} / {list(site.key)}): no single projection",
        )
    for role, name in (("query", site.query[0]), ("key", site.key[0])):
        module = modules.get(name)
        if module is None or _out_features(module) is None:
            kind = type(module).__name__ if module is not None else "no module"
            return site.name, f"the {role} layer {name} is a {kind}, not a Linear / Conv1D"
        if isinstance(getattr(module, "qk_norm", None), QKNorm):
            return site.name, "already normalized (QK-norm inserted)"
        trace = model_map.layers.get(name)
        if trace is not None and trace.norm_after is not None:
            return site.name, f"already normalized: {name} is followed by the norm {trace.norm_after}"
    return None


def _candidate(site: Any, modules: dict[str, nn.Module]) -> _Candidate | tuple[str, str]:
    query, key = site.query[0], site.key[0]
    heads = site.heads or _heads_from_module(modules[site.module_name])
    if not heads:
        return (
            site.name,
            f"the head count is unknown: not in the traced shapes nor on {site.module_name or 'the model'}",
        )
    hd = site.head_dim
    kv_heads = site.kv_heads or heads
    width_q, width_k = _out_features(modules[query]), _out_features(modules[key])
    assert width_q is not None and width_k is not None
    if query != key:
        if width_k != kv_heads * hd and width_k % hd == 0 and heads % (width_k // hd) == 0:
            kv_heads = width_k // hd  # keys repeated before the call (repeat_kv): the projection's own head count
        if width_q != heads * hd or width_k != kv_heads * hd:
            return site.name, (
                f"shapes do not divide: {query} gives {width_q} and {key} {width_k} features, expected "
                f"{heads}x{hd} and {kv_heads}x{hd}"
            )
        return _Candidate(site, query, key, heads, kv_heads, hd)
    rest = width_q - heads * hd  # packed [q | k | v] (or [q | k]) whose keys may be repeated before the call
    if rest > 0 and rest % (2 * hd) == 0 and heads % (rest // (2 * hd)) == 0:
        kv_heads = rest // (2 * hd)
    if width_q in (heads * hd + 2 * kv_heads * hd, heads * hd + kv_heads * hd):
        return _Candidate(site, query, key, heads, kv_heads, hd, 0, heads * hd, packed=True)
    if width_q == heads * hd and heads == kv_heads:
        return site.name, f"q and k both come from {query} with no split known (it gives {width_q} features)"
    return site.name, (
        f"shapes do not divide: the packed {query} gives {width_q} features, not [q | k | v] with {heads} query and "
        f"{kv_heads} key heads of {hd}"
    )


_PAIRS = {
    torch.matmul, Tensor.matmul, Tensor.__matmul__, torch.bmm, Tensor.bmm, torch.einsum,
    F.scaled_dot_product_attention,
}  # fmt: skip


def _match(t: Tensor, pattern: Tensor, offset: int, heads: int, hd: int, groups: int, batch: int | None) -> int | None:
    """The batch size if ``t`` (q or k as ``(..., T, D)``) holds at position 0 the pattern's slice by heads, else None.

    ``groups`` > 1: the tensor may hold the key heads repeated (grouped-query attention, ``repeat_kv``)."""
    if t.dim() < 2 or t.shape[-1] != hd or t.shape[-2] == 0:
        return None
    rtol = 1e-4 if t.dtype in (torch.float32, torch.float64) else 2e-2
    for seq_dim in (-2, -3) if t.dim() >= 4 else (-2,):
        first = t.select(seq_dim, 0).float().reshape(-1, hd)
        for n in {heads, heads * groups}:
            if first.shape[0] % n or (batch is not None and first.shape[0] != batch * n):
                continue
            index = torch.arange(n, device=t.device) // (n // heads)
            expected = pattern[offset : offset + heads * hd].view(heads, hd)[index].to(first.device)
            ratio = first.view(-1, n, hd) / expected
            ref = ratio.reshape(-1)[0]
            if torch.isfinite(ratio).all() and ref != 0 and torch.allclose(ratio, ref.expand_as(ratio), rtol=rtol):
                return first.shape[0] // n
    return None


class _Probe(TorchFunctionMode):
    def __init__(self, candidates: list[_Candidate], patterns: dict[str, Tensor]) -> None:
        super().__init__()
        self.candidates, self.patterns = candidates, patterns
        self.stack: list[str] = []

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func in _PAIRS and self.stack:
            flat = args[1:] if func is torch.einsum else args
            if func is torch.einsum and len(flat) == 1 and isinstance(flat[0], (list, tuple)):
                flat = flat[0]
            tensors = [a for a in flat if isinstance(a, Tensor)]
            tensors += [kwargs[k] for k in ("query", "key") if isinstance(kwargs.get(k), Tensor)]
            if len(tensors) >= 2:
                with torch._C.DisableTorchFunction():
                    self._check(self.stack[-1], tensors[0], tensors[1])
        return func(*args, **kwargs)

    def _check(self, module: str, q: Tensor, k: Tensor) -> None:
        for c in self.candidates:
            if c.confirmed or c.site.module_name != module:
                continue
            batch = _match(q, self.patterns[c.query], c.q_offset, c.heads, c.head_dim, 1, None)
            if batch is None:
                continue
            groups = c.heads // c.kv_heads if c.heads % c.kv_heads == 0 else 1
            pattern = self.patterns[c.key]
            for kt in (k, k.transpose(-2, -1)) if k.dim() >= 2 else ():
                if _match(kt, pattern, c.k_offset, c.kv_heads, c.head_dim, groups, batch) is not None:
                    c.confirmed = True
                    break


def _probe(model: nn.Module, example_input: Any, candidates: list[_Candidate]) -> str | None:
    """One forward pass with each projection's output replaced by a known pattern; marks the confirmed candidates.

    Returns the error of the probe pass, if it failed (the model is left as it was either way)."""
    modules = dict(model.named_modules())
    patterns: dict[str, Tensor] = {}
    handles = []
    probe = _Probe(candidates, patterns)

    def replace(name: str) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            if not isinstance(output, Tensor):
                return None
            width = output.shape[-1]
            pattern = (torch.arange(width, device=output.device, dtype=torch.float32) + 1) / width
            patterns[name] = pattern
            return pattern.to(output.dtype).expand(output.shape).contiguous()

        return hook

    def push(name: str) -> Any:
        return lambda module, args: probe.stack.append(name)

    def pop(module: nn.Module, args: Any, output: Any) -> None:
        probe.stack.pop()

    layers = {c.query for c in candidates} | {c.key for c in candidates}
    sites = {c.site.module_name for c in candidates}
    training = {name: m.training for name, m in modules.items()}
    try:
        for name in layers:
            handles.append(modules[name].register_forward_hook(replace(name)))
        for name in sites:
            handles.append(modules[name].register_forward_pre_hook(push(name)))
            handles.append(modules[name].register_forward_hook(pop, always_call=True))
        model.eval()
        with torch.no_grad(), probe:
            _call(model, example_input)
    except Exception as err:  # noqa: BLE001 - reported as the reason
        return f"the probe pass failed: {type(err).__name__}: {err}"
    finally:
        for handle in handles:
            handle.remove()
        for name, module in modules.items():
            module.training = training[name]
    return None


def _call(model: nn.Module, example_input: Any) -> Any:
    args, kwargs = as_call(model, example_input)
    return model(*args, **kwargs)


def insert_qk_norm(
    model: nn.Module,
    example_input: Any,
    kind: str = "layer",
    eps: float = 1e-6,
    exclude: Sequence[str] | None = None,
) -> QKNormReport:
    """Put a LayerNorm (``kind="layer"``) or RMSNorm (``"rms"``) over the head dimension on the queries and keys of
    every attention one forward pass on ``example_input`` finds.

    Per attention (see the module docstring): separate q / k projections and packed ``[q | k | v]`` projections (a
    Linear or transformers' Conv1D) get a :class:`QKNorm` child ``qk_norm`` applied by a forward hook;
    ``nn.MultiheadAttention`` becomes a :class:`QKNormMultiheadAttention`. Heads (and grouped-query key heads) come
    from the trace, else from the module (``num_heads``, ``num_attention_heads``, ``n_head``, ``config``). Sites that
    cannot be done safely are skipped with the reason (``QKNormReport.skipped``). The norms start as the identity
    affine map (weight 1, bias 0). Existing ``state_dict`` keys are unchanged; the added ones are listed.

    Args:
        model: the model (changed in place).
        example_input: a Tensor, tuple of args or dict of kwargs for ``forward``.
        kind: ``"layer"`` (LayerNorm with affine, as ViT-22B / OLMo-2) or ``"rms"`` (RMSNorm, as Qwen3).
        eps: the norms' epsilon.
        exclude: glob patterns on attention or layer names to leave as they are.

    Returns:
        a :class:`QKNormReport`.

    Raises:
        ValueError: an unknown ``kind``, a bad ``eps``, a model with no attention, or none that can take a QK-norm
            (the reasons named); the model is left unchanged.

    Example::

        >>> mha = nn.MultiheadAttention(16, 4, batch_first=True)
        >>> x = torch.randn(2, 5, 16)
        >>> report = insert_qk_norm(mha, (x, x, x))
        >>> [(s.attention, s.heads, s.head_dim, s.norm) for s in report.sites]
        [('', 4, 4, 'LayerNorm')]
        >>> mha(x, x, x)[0].shape
        torch.Size([2, 5, 16])
    """
    plan = plan_qk_norm(model, example_input, kind, eps, exclude)
    return plan.apply(model)
