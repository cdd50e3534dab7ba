"""Tiny model classes behind the sample checkpoints in this folder.

Imported as the top-level module ``sample_nets`` (``make_samples.py`` puts this folder on ``sys.path``),
so whole-module pickles reference ``sample_nets.<ClassName>``. To load those files with
``torch.load(..., weights_only=False)`` (as a test oracle), put this folder on ``sys.path`` first.

Every model here is deliberately tiny: each sample file must stay well under 200 KB.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "DynamicQuantNet",
    "FrozenNet",
    "NormHookNet",
    "ParametrizedNet",
    "QatNet",
    "RotaryEmbedding",
    "SmallCNN",
    "StaticQuantNet",
    "Symmetric",
    "TinyBlock",
    "TinyLM",
]


class SmallCNN(nn.Module):
    """Conv -> BN -> ReLU -> Conv -> BN -> ReLU -> global average pool -> Linear."""

    def __init__(self, in_channels: int = 3, width: int = 8, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, kernel_size=3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(width, 2 * width, kernel_size=3, padding=1)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


class FrozenNet(nn.Module):
    """A frozen backbone, a trainable head, a LayerNorm, and two kinds of buffer.

    - ``backbone.*`` parameters have ``requires_grad=False`` (frozen);
    - ``norm`` (LayerNorm) and ``head`` parameters are trainable;
    - ``scale`` is a persistent buffer (it is in ``state_dict()``);
    - ``cache`` is a NON-persistent buffer (``persistent=False``: absent from ``state_dict()``,
      present in the module's ``_buffers`` and listed in ``_non_persistent_buffers_set``).
    """

    def __init__(self, in_features: int = 8, hidden: int = 16, out_features: int = 4) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU())
        self.norm = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, out_features)
        self.register_buffer("scale", torch.ones(out_features))
        self.register_buffer("cache", torch.zeros(out_features), persistent=False)
        for p in self.backbone.parameters():
            p.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.head(self.norm(self.backbone(x))) * self.scale
        self.cache = y.detach().mean(0)
        return y


class RotaryEmbedding(nn.Module):
    """Holds the rotary ``inv_freq`` buffer (persistent here, so it shows up in the state dict)."""

    def __init__(self, head_dim: int, base: float = 10000.0) -> None:
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # x: (batch, heads, seq, head_dim); rotate pairs of channels by position * inv_freq.
        angles = positions.to(torch.float32)[:, None] * self.inv_freq[None, :]  # (seq, head_dim / 2)
        cos, sin = angles.cos(), angles.sin()
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


class TinyBlock(nn.Module):
    """A pre-norm transformer block: causal self-attention with rotary positions, then an MLP."""

    def __init__(self, dim: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.ln_1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln_2 = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, 2 * dim)
        self.fc_out = nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor, rotary: RotaryEmbedding, positions: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln_1(x)).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.n_heads, d // self.n_heads).transpose(1, 2) for z in (q, k, v))
        q, k = rotary(q, positions), rotary(k, positions)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        return x + self.fc_out(F.gelu(self.fc(self.ln_2(x))))


class TinyLM(nn.Module):
    """A one-block causal language model; ``lm_head.weight`` IS ``embed.weight`` when ``tie=True``.

    Buffers: ``position_ids`` (int64, shape (1, max_positions)) and ``rotary_emb.inv_freq`` (float32).
    """

    def __init__(
        self, vocab: int = 64, dim: int = 16, n_heads: int = 2, max_positions: int = 16, tie: bool = True
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.rotary_emb = RotaryEmbedding(dim // n_heads)
        self.block = TinyBlock(dim, n_heads)
        self.ln_f = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        if tie:
            self.lm_head.weight = self.embed.weight
        self.register_buffer("position_ids", torch.arange(max_positions, dtype=torch.int64).unsqueeze(0))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = self.position_ids[0, : input_ids.shape[1]]
        x = self.block(self.embed(input_ids), self.rotary_emb, positions)
        return self.lm_head(self.ln_f(x))


class QatNet(nn.Module):
    """A tiny conv net ready for eager-mode quantization-aware training (QuantStub / DeQuantStub)."""

    def __init__(self) -> None:
        super().__init__()
        self.quant = torch.ao.quantization.QuantStub()
        self.conv = nn.Conv2d(1, 4, kernel_size=3)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(4, 2)
        self.dequant = torch.ao.quantization.DeQuantStub()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.conv(self.quant(x)))
        x = self.fc(x.mean(dim=(2, 3)))
        return self.dequant(x)


class DynamicQuantNet(nn.Module):
    """Embedding -> LayerNorm -> Linear -> LSTM. ``quantize_dynamic`` over ``{nn.Linear, nn.LSTM}`` makes
    ``proj`` and ``rnn`` quantized modules (packed weights, neither parameters nor buffers) and leaves
    ``embed`` and ``norm`` float, with real parameters."""

    def __init__(self, vocab: int = 12, dim: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.norm = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, dim)
        self.rnn = nn.LSTM(dim, dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.rnn(self.proj(self.norm(self.embed(ids))))[0]


class StaticQuantNet(nn.Module):
    """QuantStub -> Conv -> BatchNorm -> ReLU -> Linear -> LayerNorm -> DeQuantStub, for eager static
    quantization (``prepare`` / ``convert``, no fusion): after ``convert`` ``conv`` and ``fc`` hold packed
    quantized weights, while the quantized BatchNorm2d and LayerNorm keep float parameters and register
    ``scale`` / ``zero_point`` buffers, as the converted QuantStub does."""

    def __init__(self) -> None:
        super().__init__()
        self.quant = torch.ao.quantization.QuantStub()
        self.conv = nn.Conv2d(1, 2, kernel_size=3)
        self.bn = nn.BatchNorm2d(2)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(8, 3)
        self.norm = nn.LayerNorm(3)
        self.dequant = torch.ao.quantization.DeQuantStub()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn(self.conv(self.quant(x))))
        return self.dequant(self.norm(self.fc(torch.flatten(x, 1))))


class Symmetric(nn.Module):
    """A parametrization (``torch.nn.utils.parametrize``): the weight is the symmetric part of ``original``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.triu() + x.triu(1).transpose(-1, -2)


class ParametrizedNet(nn.Module):
    """One Linear per parametrization kind: a custom one (``register_parametrization``), ``orthogonal``
    (buffer ``base``), ``spectral_norm`` (buffers ``_u`` / ``_v``) and ``weight_norm`` (``original0`` /
    ``original1``), then a plain LayerNorm. A parametrized module cannot be pickled whole, only its
    state dict."""

    def __init__(self, dim: int = 4) -> None:
        super().__init__()
        from torch.nn.utils import parametrizations, parametrize

        self.sym = nn.Linear(dim, dim)
        parametrize.register_parametrization(self.sym, "weight", Symmetric())
        self.ortho = parametrizations.orthogonal(nn.Linear(dim, dim))
        self.spectral = parametrizations.spectral_norm(nn.Linear(dim, dim))
        self.wn = parametrizations.weight_norm(nn.Linear(dim, dim))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.wn(self.spectral(self.ortho(self.sym(x)))))


class NormHookNet(nn.Module):
    """The older hook-based ``torch.nn.utils.spectral_norm`` (parameter ``weight_orig``, buffers
    ``weight_u`` / ``weight_v``, and ``weight`` a plain attribute) on a Conv and a Linear, and
    ``torch.nn.utils.weight_norm`` (parameters ``weight_g`` / ``weight_v``) on a Linear."""

    def __init__(self) -> None:
        super().__init__()
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # both hooks are deprecated for parametrizations
            self.conv = nn.utils.spectral_norm(nn.Conv2d(1, 2, kernel_size=3))
            self.fc = nn.utils.spectral_norm(nn.Linear(8, 4))
            self.out = nn.utils.weight_norm(nn.Linear(4, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.relu(self.fc(torch.flatten(self.conv(x), 1))))
