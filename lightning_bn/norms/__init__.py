"""Normalization surgery: a norm registry, norm insertion after layers, and conversion between norm kinds.

:func:`get_norm_layer` / :func:`create_norm_layer` / :func:`register_norm` are the registry (timm's
``create_norm_layer`` style): a kind is found by name, class or ``functools.partial``. :func:`insert_norms` puts a norm
after every hidden Linear / Conv of an existing model, chosen from the shapes of one example forward pass;
:func:`convert_norms` turns the norms of a model into another kind in place, carrying affine parameters and running
statistics. Plain torch.

Kinds normalize over different axes: ``batch`` per channel over batch and positions (Ioffe & Szegedy 2015), ``layer``
and ``rms`` over the channels at each position (Ba et al. 2016; Zhang & Sennrich 2019), ``group`` per sample over
groups of channels and all positions (Wu & He 2018), ``instance`` per sample and channel over positions. A norm whose
channel axis differs from the data's (BatchNorm on ``(N, T, C)`` from a Linear, LayerNorm on ``(N, C, H, W)`` from a
Conv) is wrapped in :class:`ChannelsLast` / :class:`ChannelsFirst`, which move the channel axis around it.

Modules: ``modules`` (the wrappers and rank-agnostic norms), ``registry`` (the kinds), ``report`` (what changed),
``insert`` (insertion), ``convert`` (conversion), ``qk`` (QK-norm: :func:`insert_qk_norm` puts a LayerNorm or RMSNorm
over the head dimension on the queries and keys of every attention). The package builds on :mod:`lightning_bn.tracing`,
:mod:`lightning_bn.activations` and :mod:`lightning_bn.monitoring.rows` only.
"""

from lightning_bn.norms.convert import convert_norms
from lightning_bn.norms.insert import AUTO_MIN_BATCH as AUTO_MIN_BATCH
from lightning_bn.norms.insert import POSITIONS as POSITIONS
from lightning_bn.norms.insert import InsertionPlan, final_layers, insert_norms, plan_insertions
from lightning_bn.norms.insert import Position as Position
from lightning_bn.norms.modules import BatchNormXd, ChannelsFirst, ChannelsLast, InstanceNormXd
from lightning_bn.norms.qk import (
    QK_NORM_KINDS,
    QKNorm,
    QKNormMultiheadAttention,
    QKNormPlan,
    QKNormReport,
    QKNormSite,
    insert_qk_norm,
    plan_qk_norm,
)
from lightning_bn.norms.registry import Layout as Layout
from lightning_bn.norms.registry import (
    NormKind,
    available_norms,
    create_norm_layer,
    default_num_groups,
    get_norm_layer,
    register_norm,
)
from lightning_bn.norms.report import NormConversion, NormInsertion, NormReport

__all__ = [
    "BatchNormXd",
    "ChannelsFirst",
    "ChannelsLast",
    "InstanceNormXd",
    "InsertionPlan",
    "NormConversion",
    "NormInsertion",
    "NormKind",
    "NormReport",
    "QK_NORM_KINDS",
    "QKNorm",
    "QKNormMultiheadAttention",
    "QKNormPlan",
    "QKNormReport",
    "QKNormSite",
    "available_norms",
    "convert_norms",
    "create_norm_layer",
    "default_num_groups",
    "final_layers",
    "get_norm_layer",
    "insert_norms",
    "insert_qk_norm",
    "plan_insertions",
    "plan_qk_norm",
    "register_norm",
]
# Also importable from here, as before, outside __all__ (the `X as X` imports): AUTO_MIN_BATCH, POSITIONS, Position,
# Layout.
