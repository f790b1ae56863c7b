"""A zoo of real architectures for conformance tests: small configs, random weights, no download.

Each entry of :data:`ZOO` builds a fresh :class:`ZooCase`: the model (built from the library that defines it, from a
``Config`` object, never ``from_pretrained``), an example input, spot checks of the activation that follows some of
its layers (read off the defining source: which nonlinearity consumes the layer's output), the parameters that must
stay one tensor, and the parameters that are deliberately all-zero.

A builder raises ``ImportError`` when the class it needs is missing (an older or newer ``transformers``): the tests
skip that case. transformers' ``PreTrainedModel`` forward returns a ``ModelOutput``; :func:`main_output` picks the
tensor to check (``logits``, else ``last_hidden_state``).

Sizes: hidden 64, 2 layers, 32 px images, sequence 16, vocabulary 100, batch 2 (4 for the BatchNorm nets).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tests.helpers import BasicBlock  # torchvision's block, shared with the other tests

__all__ = ["ZOO", "ZooCase", "main_output", "run_model"]

GELU = "gelu(approximate=none)"
GELU_TANH = "gelu(approximate=tanh)"
LEAKY = "leaky_relu(negative_slope=0.01)"
HIDDEN, LAYERS, HEADS, VOCAB, SEQ, IMAGE = 64, 2, 4, 100, 16, 32


@dataclass
class ZooCase:
    """One architecture: a model, an example input and what must hold for it."""

    model: nn.Module
    example_input: Any  # a Tensor, a tuple of args or a dict of kwargs for model(...)
    expected: dict[str, str]  # qualified layer name -> Activation.describe() of the activation after it
    ties: list[tuple[str, str]] = field(default_factory=list)  # parameter names that must stay one tensor
    zero_params: list[str] = field(default_factory=list)  # deliberately all-zero parameters prepare() must keep zero
    known_findings: dict[str, str] = field(default_factory=dict)  # init-check problem -> why it is true as built


def run_model(model: nn.Module, example_input: Any) -> Any:
    """``model(...)`` on an example input given as a Tensor, a tuple of args or a dict of kwargs."""
    if isinstance(example_input, dict):
        return model(**example_input)
    if isinstance(example_input, tuple):
        return model(*example_input)
    return model(example_input)


def main_output(output: Any) -> Tensor:
    """The tensor that stands for a model's output: logits, the last hidden state, or the first tensor."""
    if isinstance(output, Tensor):
        return output
    for key in ("logits", "last_hidden_state"):
        value = getattr(output, key, None)
        if isinstance(value, Tensor):
            return value
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, (tuple, list)):
        return next(t for t in output if isinstance(t, Tensor))
    raise TypeError(f"Expected a Tensor or a model output holding one but got {type(output).__name__}")


def _transformers(*names: str) -> list[Any]:
    """The named classes of the installed ``transformers``; ``ImportError`` naming the one missing."""
    import transformers

    found = []
    for name in names:
        try:
            found.append(getattr(transformers, name))
        except (AttributeError, ImportError) as error:  # transformers' lazy module raises either
            raise ImportError(f"transformers {transformers.__version__} has no {name}") from error
    return found


def _ids(batch: int = 2, seq: int = SEQ, seed: int = 1) -> Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _images(batch: int = 2, size: int = IMAGE, seed: int = 2) -> Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _eval(model: nn.Module) -> nn.Module:
    return model.eval()


class _Names:
    """The module names of a model, to pick the spelling the installed library uses (names change across versions)."""

    def __init__(self, model: nn.Module) -> None:
        self.names = {n for n, _ in model.named_modules()}

    def pick(self, *candidates: str) -> str:
        found = next((n for n in candidates if n in self.names), None)
        if found is None:
            raise ImportError(f"none of {list(candidates)} in this version's module tree")
        return found


# ---------------------------------------------------------------------------------------------------------------------
# transformers
# ---------------------------------------------------------------------------------------------------------------------


def bert() -> ZooCase:
    # BertIntermediate: dense -> ACT2FN["gelu"] (GELUActivation: exact gelu); BertPooler: dense -> nn.Tanh;
    # BertSelfAttention: query/key/value -> reshape -> attention (no nonlinearity); BertOutput: dense -> dropout ->
    # LayerNorm(+ residual) -> next layer; the classifier is the logits layer.
    config_cls, model_cls = _transformers("BertConfig", "BertForSequenceClassification")
    torch.manual_seed(0)
    config = config_cls(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        intermediate_size=4 * HIDDEN, max_position_embeddings=2 * SEQ, type_vocab_size=2, num_labels=3,
    )  # fmt: skip
    model = _eval(model_cls(config))
    layer = "bert.encoder.layer.0"
    expected = {
        f"{layer}.intermediate.dense": GELU,
        "bert.encoder.layer.1.intermediate.dense": GELU,
        f"{layer}.attention.self.query": "identity",
        f"{layer}.attention.self.key": "identity",
        f"{layer}.output.dense": "identity",
        "bert.pooler.dense": "tanh",
        "classifier": "identity",
    }
    example = {"input_ids": _ids(), "attention_mask": torch.ones(2, SEQ, dtype=torch.long)}
    return ZooCase(model, example, expected)


def gpt2() -> ZooCase:
    # GPT2MLP: c_fc (Conv1D) -> ACT2FN["gelu_new"] (NewGELUActivation: tanh approximation) -> c_proj (Conv1D);
    # GPT2Attention: c_attn (Conv1D) -> split into q, k, v -> attention -> c_proj. lm_head is tied to wte.
    config_cls, model_cls = _transformers("GPT2Config", "GPT2LMHeadModel")
    torch.manual_seed(0)
    config = config_cls(
        vocab_size=VOCAB,
        n_positions=2 * SEQ,
        n_embd=HIDDEN,
        n_layer=LAYERS,
        n_head=HEADS,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = _eval(model_cls(config))
    expected = {
        "transformer.h.0.mlp.c_fc": GELU_TANH,
        "transformer.h.1.mlp.c_fc": GELU_TANH,
        "transformer.h.0.mlp.c_proj": "identity",
        "transformer.h.0.attn.c_attn": "identity",
        "transformer.h.0.attn.c_proj": "identity",
        "lm_head": "identity",
    }
    return ZooCase(model, {"input_ids": _ids()}, expected, ties=[("lm_head.weight", "transformer.wte.weight")])


def llama() -> ZooCase:
    # LlamaMLP: down_proj(act_fn(gate_proj(x)) * up_proj(x)), act_fn = ACT2FN["silu"]: gate_proj feeds SiLU, up_proj
    # feeds only the product, down_proj the residual sum; q/k/v_proj feed rotary embedding and attention.
    config_cls, model_cls = _transformers("LlamaConfig", "LlamaForCausalLM")
    torch.manual_seed(0)
    config = config_cls(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=HEADS // 2, max_position_embeddings=2 * SEQ,
        tie_word_embeddings=False,
    )  # fmt: skip
    model = _eval(model_cls(config))
    layer = "model.layers.0"
    expected = {
        f"{layer}.mlp.gate_proj": "silu",
        "model.layers.1.mlp.gate_proj": "silu",
        f"{layer}.mlp.up_proj": "identity",
        f"{layer}.mlp.down_proj": "identity",
        f"{layer}.self_attn.q_proj": "identity",
        f"{layer}.self_attn.k_proj": "identity",
        f"{layer}.self_attn.o_proj": "identity",
        "lm_head": "identity",
    }
    return ZooCase(model, {"input_ids": _ids()}, expected)


def t5() -> ZooCase:
    # T5DenseActDense: wi -> ACT2FN["relu"] -> dropout -> wo (feed_forward_proj="relu"); T5Attention: q/k/v -> scores
    # without 1/sqrt(d) scaling (folded into q's init). encoder/decoder embed_tokens (and lm_head, tied word
    # embeddings) share `shared.weight`.
    config_cls, model_cls = _transformers("T5Config", "T5ForConditionalGeneration")
    torch.manual_seed(0)
    config = config_cls(
        vocab_size=VOCAB, d_model=HIDDEN, d_kv=HIDDEN // HEADS, d_ff=2 * HIDDEN, num_layers=LAYERS,
        num_decoder_layers=LAYERS, num_heads=HEADS, relative_attention_num_buckets=8, feed_forward_proj="relu",
        decoder_start_token_id=0, pad_token_id=0, tie_word_embeddings=True,
    )  # fmt: skip
    model = _eval(model_cls(config))
    expected = {
        "encoder.block.0.layer.1.DenseReluDense.wi": "relu",
        "encoder.block.1.layer.1.DenseReluDense.wi": "relu",
        "decoder.block.0.layer.2.DenseReluDense.wi": "relu",
        "encoder.block.0.layer.1.DenseReluDense.wo": "identity",
        "encoder.block.0.layer.0.SelfAttention.q": "identity",
        "encoder.block.0.layer.0.SelfAttention.v": "identity",
        "lm_head": "identity",
    }
    ties = [
        ("shared.weight", "encoder.embed_tokens.weight"),
        ("shared.weight", "decoder.embed_tokens.weight"),
        ("shared.weight", "lm_head.weight"),
    ]
    example = {"input_ids": _ids(), "decoder_input_ids": _ids(seq=8, seed=3)}
    return ZooCase(model, example, expected, ties=ties)


def vit() -> ZooCase:
    # ViT MLP (ViTIntermediate before transformers 5.x): fc1 / intermediate.dense -> ACT2FN["gelu"] -> fc2 /
    # output.dense -> + residual; attention: q_proj / query (k, v) -> attention; patch embedding conv -> flatten ->
    # + position embeddings -> the first layer's LayerNorm; classifier: logits of the CLS token.
    config_cls, model_cls = _transformers("ViTConfig", "ViTForImageClassification")
    torch.manual_seed(0)
    config = config_cls(
        image_size=IMAGE, patch_size=8, num_channels=3, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, intermediate_size=2 * HIDDEN, num_labels=10,
    )  # fmt: skip
    model = _eval(model_cls(config))
    names = _Names(model)
    expected = {}
    for i in range(LAYERS):  # transformers 5.x: vit.layers.i.mlp.fc1; 4.x: vit.encoder.layer.i.intermediate.dense
        expected[names.pick(f"vit.layers.{i}.mlp.fc1", f"vit.encoder.layer.{i}.intermediate.dense")] = GELU
    expected |= {
        names.pick("vit.layers.0.attention.q_proj", "vit.encoder.layer.0.attention.attention.query"): "identity",
        names.pick("vit.layers.0.attention.v_proj", "vit.encoder.layer.0.attention.attention.value"): "identity",
        names.pick("vit.layers.0.mlp.fc2", "vit.encoder.layer.0.output.dense"): "identity",
        "vit.embeddings.patch_embeddings.projection": "identity",
        "classifier": "identity",
    }
    return ZooCase(model, {"pixel_values": _images()}, expected)


def convnext() -> ZooCase:
    # ConvNextLayer: dwconv -> permute -> LayerNorm -> pwconv1 (Linear) -> GELU -> pwconv2 -> * layer_scale ->
    # permute -> + residual; the stem conv feeds a LayerNorm then the first block.
    config_cls, model_cls = _transformers("ConvNextConfig", "ConvNextModel")
    torch.manual_seed(0)
    config = config_cls(num_channels=3, patch_size=4, num_stages=2, hidden_sizes=[32, HIDDEN], depths=[1, 1])
    model = _eval(model_cls(config))
    expected = {
        "encoder.stages.0.layers.0.pwconv1": GELU,
        "encoder.stages.1.layers.0.pwconv1": GELU,
        "encoder.stages.0.layers.0.pwconv2": "identity",
        "encoder.stages.0.layers.0.dwconv": "identity",
        "embeddings.patch_embeddings": "identity",
    }
    return ZooCase(model, {"pixel_values": _images(batch=4)}, expected)


def resnet() -> ZooCase:
    # ResNetConvLayer: conv -> BatchNorm -> ReLU (activation=None: Identity, for the last conv of a block);
    # ResNetBasicLayer: layer(x) += shortcut(x) -> ReLU, so the last conv and the shortcut conv feed that ReLU.
    config_cls, model_cls = _transformers("ResNetConfig", "ResNetModel")
    torch.manual_seed(0)
    config = config_cls(
        num_channels=3, embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic",
        hidden_act="relu", downsample_in_first_stage=False,
    )  # fmt: skip
    model = _eval(model_cls(config))
    block = "encoder.stages.1.layers.0"
    expected = {
        "embedder.embedder.convolution": "relu",
        "encoder.stages.0.layers.0.layer.0.convolution": "relu",
        "encoder.stages.0.layers.0.layer.1.convolution": "relu",
        f"{block}.layer.0.convolution": "relu",
        f"{block}.shortcut.convolution": "relu",
    }
    return ZooCase(model, {"pixel_values": _images(batch=4)}, expected)


def mobilenet_v2() -> ZooCase:
    # MobileNetV2ConvLayer: (tf padding) conv -> BatchNorm -> ReLU6 (hidden_act "relu6"); the inverted residual's
    # reduce_1x1 has no activation (linear bottleneck), its output is summed with the residual / fed to the next
    # block's expand_1x1 conv.
    config_cls, model_cls = _transformers("MobileNetV2Config", "MobileNetV2Model")
    torch.manual_seed(0)
    config = config_cls(num_channels=3, image_size=IMAGE, depth_multiplier=0.35, min_depth=8)
    model = _eval(model_cls(config))
    expected = {
        "conv_stem.first_conv.convolution": "relu6",
        "conv_stem.conv_3x3.convolution": "relu6",
        "conv_stem.reduce_1x1.convolution": "identity",
        "layer.0.expand_1x1.convolution": "relu6",
        "layer.0.conv_3x3.convolution": "relu6",
        "layer.0.reduce_1x1.convolution": "identity",
        "conv_1x1.convolution": "relu6",
    }
    return ZooCase(model, {"pixel_values": _images(batch=4)}, expected)


def swin() -> ZooCase:
    # Swin MLP (SwinIntermediate before transformers 5.x): fc1 / intermediate.dense -> ACT2FN["gelu"] -> fc2 /
    # output.dense -> + residual; windowed attention: q_proj / query -> scores (+ the relative position bias table,
    # a parameter of no layer) -> o_proj / output.dense -> + residual.
    config_cls, model_cls = _transformers("SwinConfig", "SwinModel")
    torch.manual_seed(0)
    config = config_cls(
        image_size=IMAGE, patch_size=4, num_channels=3, embed_dim=32, depths=[1, 1], num_heads=[2, 4], window_size=4,
        mlp_ratio=2.0,
    )  # fmt: skip
    model = _eval(model_cls(config))
    names = _Names(model)
    expected = {}
    for i in range(2):
        block = f"encoder.layers.{i}.blocks.0"
        expected[names.pick(f"{block}.mlp.fc1", f"{block}.intermediate.dense")] = GELU
    block = "encoder.layers.0.blocks.0"
    expected |= {
        names.pick(f"{block}.attention.q_proj", f"{block}.attention.self.query"): "identity",
        names.pick(f"{block}.attention.o_proj", f"{block}.attention.output.dense"): "identity",
        names.pick(f"{block}.mlp.fc2", f"{block}.output.dense"): "identity",
        "encoder.layers.0.downsample.reduction": "identity",
    }
    return ZooCase(model, {"pixel_values": _images()}, expected)


def efficientnet() -> ZooCase:
    # EfficientNet (hidden_act "swish" = SiLU): stem conv -> BN -> SiLU; expansion conv -> BN -> SiLU; depthwise conv
    # -> BN -> SiLU; squeeze-excite: reduce conv -> SiLU, expand conv -> Sigmoid; project conv -> BN (linear
    # bottleneck); top conv -> BN -> SiLU.
    config_cls, model_cls = _transformers("EfficientNetConfig", "EfficientNetModel")
    torch.manual_seed(0)
    config = config_cls(
        image_size=IMAGE, width_coefficient=0.25, depth_coefficient=1.0, in_channels=[32, 16], out_channels=[16, 24],
        kernel_sizes=[3, 3], strides=[1, 2], expand_ratios=[1, 6], num_block_repeats=[1, 1], depthwise_padding=[],
        hidden_dim=320,
    )  # fmt: skip
    model = _eval(model_cls(config))
    expected = {
        "embeddings.convolution": "silu",
        "encoder.blocks.0.depthwise_conv.depthwise_conv": "silu",
        "encoder.blocks.0.squeeze_excite.reduce": "silu",
        "encoder.blocks.0.squeeze_excite.expand": "sigmoid",
        "encoder.blocks.0.projection.project_conv": "identity",
        "encoder.blocks.1.expansion.expand_conv": "silu",
        "encoder.top_conv": "silu",
    }
    # transformers' EfficientNet `_init_weights` draws every BatchNorm gamma from N(0, 0.02) (timm and the paper use 1):
    # the signal really shrinks with depth, and the check must say so
    known = {
        "vanishing": "BatchNorm gammas drawn from N(0, 0.02) by transformers' _init_weights",
        "weight_scale": "the squeeze-excite convs get a vanishing input (same cause): prepare() would rescale them far",
    }
    return ZooCase(model, {"pixel_values": _images(batch=4)}, expected, known_findings=known)


def regnet() -> ZooCase:
    # RegNetConvLayer: conv -> BN -> ReLU (Identity for the last conv of a block); RegNetYLayer: layer(x) +
    # shortcut(x) -> ReLU; RegNetSELayer: pool -> conv -> ReLU -> conv -> Sigmoid -> * x.
    config_cls, model_cls = _transformers("RegNetConfig", "RegNetModel")
    torch.manual_seed(0)
    config = config_cls(
        num_channels=3, embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], groups_width=8, layer_type="y",
        hidden_act="relu",
    )  # fmt: skip
    model = _eval(model_cls(config))
    block = "encoder.stages.0.layers.0"
    expected = {
        "embedder.embedder.convolution": "relu",
        f"{block}.layer.0.convolution": "relu",
        f"{block}.layer.1.convolution": "relu",
        f"{block}.layer.2.attention.0": "relu",
        f"{block}.layer.2.attention.2": "sigmoid",
        f"{block}.layer.3.convolution": "relu",
        f"{block}.shortcut.convolution": "relu",
    }
    return ZooCase(model, {"pixel_values": _images(batch=4)}, expected)


# ---------------------------------------------------------------------------------------------------------------------
# Lightning demos
# ---------------------------------------------------------------------------------------------------------------------


def lightning_transformer() -> ZooCase:
    # nn.Transformer layers: linear1 -> ReLU (F.relu, the default activation) -> dropout -> linear2; the decoder
    # Linear gives the logits (then log_softmax, no hidden nonlinearity).
    from lightning.pytorch.demos import Transformer

    torch.manual_seed(0)
    model = _eval(Transformer(vocab_size=VOCAB, ninp=HIDDEN, nhead=HEADS, nhid=2 * HIDDEN, nlayers=LAYERS, dropout=0.1))
    expected = {
        "transformer.encoder.layers.0.linear1": "relu",
        "transformer.encoder.layers.1.linear1": "relu",
        "transformer.decoder.layers.0.linear1": "relu",
        "transformer.encoder.layers.0.linear2": "identity",
        "decoder": "identity",
    }
    return ZooCase(model, (_ids(), _ids(seed=3)), expected)


def boring_model() -> ZooCase:
    from lightning.pytorch.demos.boring_classes import BoringModel

    torch.manual_seed(0)
    model = _eval(BoringModel())
    return ZooCase(model, torch.randn(8, 32, generator=torch.Generator().manual_seed(4)), {"layer": "identity"})


# ---------------------------------------------------------------------------------------------------------------------
# Hand-written models and stand-ins for timm / torchvision patterns (neither can be imported here)
# ---------------------------------------------------------------------------------------------------------------------


class LSTMClassifier(nn.Module):
    """Embedding -> LSTM -> Linear head on the last step."""

    def __init__(self, vocab: int = VOCAB, dim: int = HIDDEN, classes: int = 5) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.lstm = nn.LSTM(dim, dim, num_layers=LAYERS, batch_first=True)
        self.head = nn.Linear(dim, classes)

    def forward(self, ids: Tensor) -> Tensor:
        out, _ = self.lstm(self.embed(ids))
        return self.head(out[:, -1])


def lstm_classifier() -> ZooCase:
    torch.manual_seed(0)
    return ZooCase(_eval(LSTMClassifier()), _ids(), {"embed": "identity", "head": "identity"})


class BatchNormAct2d(nn.BatchNorm2d):
    """timm's norm-act pattern: a BatchNorm2d subclass that applies its activation child in ``forward``."""

    def __init__(self, num_features: int, act_layer: type[nn.Module] = nn.SiLU) -> None:
        super().__init__(num_features)
        self.drop = nn.Identity()
        self.act = act_layer()

    def forward(self, x: Tensor) -> Tensor:
        x = F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, self.training, self.momentum, self.eps
        )
        return self.act(self.drop(x))


class TimmNormActNet(nn.Module):
    """conv -> BatchNormAct2d(SiLU), twice, then pooled logits."""

    def __init__(self, width: int = 32, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn1 = BatchNormAct2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=2, padding=1, bias=False)
        self.bn2 = BatchNormAct2d(width)
        self.head = nn.Linear(width, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.bn2(self.conv2(self.bn1(self.conv1(x))))
        return self.head(x.mean((2, 3)))


def timm_norm_act() -> ZooCase:
    torch.manual_seed(0)
    expected = {"conv1": "silu", "conv2": "silu", "head": "identity"}
    return ZooCase(_eval(TimmNormActNet()), _images(batch=4), expected)


class MixerMlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class MixerBlock(nn.Module):
    def __init__(self, tokens: int, dim: int) -> None:
        super().__init__()
        self.norm1, self.mlp_tokens = nn.LayerNorm(dim), MixerMlp(tokens, tokens * 2)
        self.norm2, self.mlp_channels = nn.LayerNorm(dim), MixerMlp(dim, dim * 2)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.mlp_tokens(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.mlp_channels(self.norm2(x))


class Mixer(nn.Module):
    """MLP-Mixer (timm's layout): patch conv -> token/channel-mixing blocks -> norm -> mean -> zero-initialized head."""

    def __init__(self, dim: int = HIDDEN, patch: int = 8, classes: int = 10) -> None:
        super().__init__()
        tokens = (IMAGE // patch) ** 2
        self.stem = nn.Conv2d(3, dim, patch, stride=patch)
        self.blocks = nn.Sequential(*(MixerBlock(tokens, dim) for _ in range(LAYERS)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)
        nn.init.zeros_(self.head.weight)  # timm: head_init_scale / zero head for fine-tuning stability
        nn.init.zeros_(self.head.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x).flatten(2).transpose(1, 2)  # (N, T, C)
        return self.head(self.norm(self.blocks(x)).mean(1))


def mixer_zero_head() -> ZooCase:
    torch.manual_seed(0)
    expected = {
        "blocks.0.mlp_tokens.fc1": GELU,
        "blocks.0.mlp_channels.fc1": GELU,
        "blocks.1.mlp_channels.fc1": GELU,
        "blocks.0.mlp_channels.fc2": "identity",
        "head": "identity",
    }
    return ZooCase(_eval(Mixer()), _images(), expected, zero_params=["head.weight"])


class LayerScaleBlock(nn.Module):
    """A ViT block with LayerScale (CaiT / timm ``init_values``): ``x + gamma * branch(norm(x))``."""

    def __init__(self, dim: int = HIDDEN, heads: int = HEADS) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.qkv, self.proj = nn.LayerNorm(dim), nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.gamma_1 = nn.Parameter(1e-5 * torch.ones(dim))
        self.norm2, self.fc1, self.act, self.fc2 = (
            nn.LayerNorm(dim),
            nn.Linear(dim, 2 * dim),
            nn.GELU(),
            nn.Linear(2 * dim, dim),
        )
        self.gamma_2 = nn.Parameter(1e-5 * torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        n, t, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(n, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, t, c)
        x = x + self.proj(attended) * self.gamma_1
        return x + self.fc2(self.act(self.fc1(self.norm2(x)))) * self.gamma_2


class LayerScaleViT(nn.Module):
    def __init__(self, dim: int = HIDDEN, patch: int = 8, classes: int = 10) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, patch, stride=patch)
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, (IMAGE // patch) ** 2, dim))
        self.blocks = nn.Sequential(*(LayerScaleBlock(dim) for _ in range(LAYERS)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed
        return self.head(self.norm(self.blocks(x)).mean(1))


def vit_layer_scale() -> ZooCase:
    torch.manual_seed(0)
    expected = {
        "blocks.0.fc1": GELU,
        "blocks.1.fc1": GELU,
        "blocks.0.qkv": "identity",
        "blocks.0.proj": "identity",
        "blocks.0.fc2": "identity",
        "head": "identity",
    }
    return ZooCase(_eval(LayerScaleViT()), _images(), expected)


class Conv1DMlpNet(nn.Module):
    """GPT-2's MLP built from transformers' ``Conv1D`` (weight stored ``(in, out)``) and ``NewGELUActivation``."""

    def __init__(self, dim: int = HIDDEN, classes: int = 10) -> None:
        super().__init__()
        from transformers.activations import NewGELUActivation
        from transformers.pytorch_utils import Conv1D

        self.embed = nn.Embedding(VOCAB, dim)
        self.blocks = nn.ModuleList()
        for _ in range(LAYERS):
            block = nn.Module()
            block.ln = nn.LayerNorm(dim)
            block.c_fc, block.act, block.c_proj = Conv1D(4 * dim, dim), NewGELUActivation(), Conv1D(dim, 4 * dim)
            self.blocks.append(block)
        self.ln_f = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, ids: Tensor) -> Tensor:
        x = self.embed(ids)
        for block in self.blocks:
            x = x + block.c_proj(block.act(block.c_fc(block.ln(x))))
        return self.head(self.ln_f(x)[:, -1])


def gpt2_conv1d_mlp() -> ZooCase:
    torch.manual_seed(0)
    model = _eval(Conv1DMlpNet())  # ImportError without transformers: skipped
    expected = {
        "blocks.0.c_fc": GELU_TANH,
        "blocks.1.c_fc": GELU_TANH,
        "blocks.0.c_proj": "identity",
        "head": "identity",
    }
    return ZooCase(model, _ids(), expected)


class TinyResNet(nn.Module):
    """torchvision's ResNet layout and init (kaiming fan_out for convs), with ``zero_init_residual=True``."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = nn.Sequential(BasicBlock(16, 16), BasicBlock(16, 16))
        self.layer2 = nn.Sequential(BasicBlock(16, 32, stride=2), BasicBlock(32, 32))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        for m in self.modules():  # zero_init_residual=True
            if isinstance(m, BasicBlock):
                nn.init.constant_(m.bn2.weight, 0)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet_zero_init_residual() -> ZooCase:
    torch.manual_seed(0)
    model = _eval(TinyResNet())
    expected = {
        "conv1": "relu",
        "layer1.0.conv1": "relu",
        "layer1.0.conv2": "relu",
        "layer2.0.downsample.0": "relu",
        "fc": "identity",
    }
    zero = [f"layer{i}.{j}.bn2.weight" for i in (1, 2) for j in (0, 1)]
    return ZooCase(model, _images(batch=4), expected, zero_params=zero)


class T5LikeAttention(nn.Module):
    """T5's attention: the 1/sqrt(d_kv) of scaled dot-product attention is folded into q's init, not the forward."""

    def __init__(self, dim: int = HIDDEN, heads: int = HEADS) -> None:
        super().__init__()
        self.heads, self.d_kv = heads, dim // heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim, bias=False) for _ in range(4))
        nn.init.normal_(self.q.weight, std=(dim * self.d_kv) ** -0.5)  # T5PreTrainedModel._init_weights
        nn.init.normal_(self.k.weight, std=dim**-0.5)
        nn.init.normal_(self.v.weight, std=dim**-0.5)
        nn.init.normal_(self.o.weight, std=(heads * self.d_kv) ** -0.5)

    def forward(self, x: Tensor) -> Tensor:
        n, t, c = x.shape

        def split(y: Tensor) -> Tensor:
            return y.view(n, t, self.heads, self.d_kv).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        weights = torch.softmax(q @ k.transpose(-1, -2), dim=-1)  # no 1/sqrt(d_kv): it is in q's init
        return self.o((weights @ v).transpose(1, 2).reshape(n, t, c))


class T5LikeNet(nn.Module):
    def __init__(self, dim: int = HIDDEN) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, dim)
        nn.init.normal_(self.embed.weight, std=1.0)  # T5: shared embedding ~ N(0, 1)
        self.norm1, self.attn = nn.RMSNorm(dim), T5LikeAttention(dim)
        self.norm2, self.head = nn.RMSNorm(dim), nn.Linear(dim, VOCAB, bias=False)
        nn.init.normal_(self.head.weight, std=dim**-0.5)

    def forward(self, ids: Tensor) -> Tensor:
        x = self.embed(ids)
        x = x + self.attn(self.norm1(x))
        return self.head(self.norm2(x))


def t5_like_attention() -> ZooCase:
    torch.manual_seed(0)
    if not hasattr(nn, "RMSNorm"):
        raise ImportError(f"torch {torch.__version__} has no nn.RMSNorm")
    expected = {"attn.q": "identity", "attn.k": "identity", "attn.v": "identity", "attn.o": "identity"}
    expected["head"] = "identity"
    return ZooCase(_eval(T5LikeNet()), _ids(), expected)


class DarkBlock(nn.Module):
    """timm CSPDarknet's DarkBlock: 1x1 then 3x3 conv, each followed by a norm-act layer (BatchNormAct2d,
    LeakyReLU), plus the identity; ``zero_init_last``: the 3x3's norm weight is 0, so its activation outputs
    f(bias) = 0 at first."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels // 2, 1, bias=False)
        self.bn1 = BatchNormAct2d(channels // 2, nn.LeakyReLU)
        self.conv2 = nn.Conv2d(channels // 2, channels, 3, padding=1, bias=False)
        self.bn2 = BatchNormAct2d(channels, nn.LeakyReLU)
        nn.init.zeros_(self.bn2.weight)  # zero_init_last

    def forward(self, x: Tensor) -> Tensor:
        return x + self.bn2(self.conv2(self.bn1(self.conv1(x))))


class CspDarknetZeroLast(nn.Module):
    """A stem norm-act conv, two DarkBlocks under ``zero_init_last``, pooled logits."""

    def __init__(self, width: int = 32, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.stem_bn = BatchNormAct2d(width, nn.LeakyReLU)
        self.blocks = nn.Sequential(DarkBlock(width), DarkBlock(width))
        self.head = nn.Linear(width, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(self.stem_bn(self.stem(x))).mean((2, 3)))


def cspdarknet_zero_last() -> ZooCase:
    torch.manual_seed(0)
    expected = {"stem": LEAKY, "blocks.0.conv1": LEAKY, "blocks.0.conv2": LEAKY, "head": "identity"}
    return ZooCase(_eval(CspDarknetZeroLast()), _images(batch=4), expected,
                   zero_params=["blocks.0.bn2.weight", "blocks.1.bn2.weight"])  # fmt: skip


class WideZeroHead(nn.Module):
    """A ConvNeXt/Mixer-style classifier on 4096 features whose ``10 x 4096`` head is zero-initialized (above the
    4096 weights from which the gradient monitor samples its update ratio)."""

    def __init__(self, features: int = 4096, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 4, stride=4)
        self.fc = nn.Linear(16, features)
        self.norm = nn.LayerNorm(features)
        self.act = nn.GELU()
        self.head = nn.Linear(features, classes)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.act(self.norm(self.fc(self.stem(x).mean((2, 3))))))


def wide_zero_head() -> ZooCase:
    torch.manual_seed(0)
    expected = {"fc": GELU, "head": "identity"}
    return ZooCase(_eval(WideZeroHead()), _images(), expected, zero_params=["head.weight", "head.bias"])


class MixFfn(nn.Module):
    """Segformer's Mix-FFN: 1x1 conv up, a small-init 3x3 depthwise conv (its GELU runs at ~1e-2 of the stream),
    GELU, 1x1 conv down (He init)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden, dim, 1)
        for conv in (self.fc1, self.fc2):
            nn.init.kaiming_normal_(conv.weight)
            nn.init.zeros_(conv.bias)
        nn.init.normal_(self.dwconv.weight, std=0.005)
        nn.init.zeros_(self.dwconv.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.dwconv(self.fc1(x))))


class SegformerLike(nn.Module):
    """A depthwise-conv GELU encoder (Mix-FFN blocks: its GELUs run at ~5e-3) then the decode head's 1x1 fuse conv,
    BatchNorm and ReLU (~0.6): the first ReLU is over 100 times the first GELU, by design."""

    def __init__(self, dim: int = 32, classes: int = 10) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, stride=4)
        self.blocks = nn.ModuleList(MixFfn(dim, dim * 4) for _ in range(2))
        self.fuse = nn.Conv2d(dim, dim, 1, bias=False)
        self.bn = nn.BatchNorm2d(dim)
        self.relu = nn.ReLU()
        self.cls = nn.Conv2d(dim, classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch(x)
        for block in self.blocks:
            x = x + block(x)
        return self.cls(self.relu(self.bn(self.fuse(x)))).mean((2, 3))


def segformer_like() -> ZooCase:
    torch.manual_seed(0)
    expected = {"blocks.0.dwconv": GELU, "blocks.1.dwconv": GELU, "fuse": "relu", "cls": "identity"}
    known = {"weight_scale": "the depthwise convs are drawn at std 0.005 on purpose: the pattern is a GELU encoder "
             "running at ~1e-2 of the stream (the report must not compare the decode head's ReLU with it)"}
    return ZooCase(_eval(SegformerLike()), _images(batch=4), expected, known_findings=known)


class MobileNetV3Like(nn.Module):
    """torchvision's MobileNetV3 layout and init: conv-BN-Hardswish/ReLU features (kaiming fan_out), then the
    classifier Linear -> Hardswish -> Linear with N(0, 0.01) weights: the last Hardswish's input is deliberately
    small next to the features' (the depth rule once read that end point as "vanishing with depth")."""

    def __init__(self, width: int = 16, last: int = 96, hidden: int = 1024, classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for i, act in enumerate([nn.Hardswish, nn.ReLU, nn.ReLU, nn.Hardswish, nn.Hardswish]):
            out = last if i == 4 else width
            layers += [nn.Conv2d(channels, out, 3 if i < 4 else 1, padding=1 if i < 4 else 0, bias=False),
                       nn.BatchNorm2d(out), act()]  # fmt: skip
            channels = out
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Linear(last, hidden), nn.Hardswish(), nn.Linear(hidden, classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x).mean((2, 3)))


def mobilenet_v3_like() -> ZooCase:
    torch.manual_seed(0)
    expected = {"features.0": "hardswish", "features.3": "relu", "classifier.0": "hardswish",
                "classifier.2": "identity"}  # fmt: skip
    return ZooCase(_eval(MobileNetV3Like()), _images(batch=4), expected)


ZOO: dict[str, Callable[[], ZooCase]] = {
    "bert": bert,
    "gpt2": gpt2,
    "llama": llama,
    "t5": t5,
    "vit": vit,
    "convnext": convnext,
    "resnet": resnet,
    "mobilenet_v2": mobilenet_v2,
    "swin": swin,
    "efficientnet": efficientnet,
    "regnet": regnet,
    "lightning_transformer": lightning_transformer,
    "boring_model": boring_model,
    "lstm_classifier": lstm_classifier,
    "timm_norm_act": timm_norm_act,
    "mixer_zero_head": mixer_zero_head,
    "vit_layer_scale": vit_layer_scale,
    "gpt2_conv1d_mlp": gpt2_conv1d_mlp,
    "resnet_zero_init_residual": resnet_zero_init_residual,
    "t5_like_attention": t5_like_attention,
    "cspdarknet_zero_last": cspdarknet_zero_last,
    "wide_zero_head": wide_zero_head,
    "segformer_like": segformer_like,
    "mobilenet_v3_like": mobilenet_v3_like,
}
