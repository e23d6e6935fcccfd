"""A small UNet laid out like the WebUI's ldm ``UNetModel`` for SD1.x, with real attention.

Module paths match SD1's (``input_blocks.1.1.transformer_blocks.0.attn2`` ...): 12 input blocks
with skip outputs, a middle block, 12 output blocks that upsample after blocks 2, 5 and 8, and
cross-attention at the same blocks and resolutions as SD1.5. Widths are tiny. Odd latent sizes
work as in the WebUI, whose ``cat`` hijack resizes the upsampled tensor to its skip connection.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

CONTEXT_DIM = 16
WIDTHS = (8, 16, 32, 32)  # per level; SD1.5: 320, 640, 1280, 1280
HEADS = 2


class CrossAttention(nn.Module):
    """ldm's attention module: ``to_q/to_k/to_v``, ``to_out = [Linear, Dropout]``, ``heads``."""

    def __init__(self, query_dim: int, context_dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(query_dim, query_dim, bias=False)
        self.to_k = nn.Linear(context_dim, query_dim, bias=False)
        self.to_v = nn.Linear(context_dim, query_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(query_dim, query_dim), nn.Dropout(0.0))

    def forward(self, x, context=None, mask=None):
        context = x if context is None else context
        b, n, c = x.shape
        q, k, v = (
            t.view(b, -1, self.heads, c // self.heads).transpose(1, 2)
            for t in (self.to_q(x), self.to_k(context), self.to_v(context))
        )
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)
        return self.to_out(out)


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn1 = CrossAttention(dim, dim, HEADS)
        self.attn2 = CrossAttention(dim, CONTEXT_DIM, HEADS)

    def forward(self, x, context):
        x = x + self.attn1(self.norm1(x))
        return x + self.attn2(self.norm2(x), context=context)


class SpatialTransformer(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.proj_in = nn.Conv2d(dim, dim, 1)
        self.transformer_blocks = nn.ModuleList([BasicTransformerBlock(dim)])
        self.proj_out = nn.Conv2d(dim, dim, 1)

    def forward(self, x, context):
        b, c, h, w = x.shape
        tokens = self.proj_in(x).flatten(2).transpose(1, 2)
        for block in self.transformer_blocks:
            tokens = block(tokens, context)
        return x + self.proj_out(tokens.transpose(1, 2).reshape(b, c, h, w))


class Res(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1)

    def forward(self, x, context):
        return F.silu(self.conv(x))


class Down(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.op = nn.Conv2d(c_in, c_out, 3, stride=2, padding=1)

    def forward(self, x, context):
        return self.op(x)


class Up(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 1)

    def forward(self, x, context):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Seq(nn.ModuleList):
    def forward(self, x, context):
        for layer in self:
            x = layer(x, context)
        return x


class TinyLdmUNet(nn.Module):
    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        w = WIDTHS
        self.time_embed = nn.Linear(1, w[0])
        self.input_blocks = nn.ModuleList(
            [
                Seq([_Conv(4, w[0])]),
                Seq([Res(w[0], w[0]), SpatialTransformer(w[0])]),
                Seq([Res(w[0], w[0]), SpatialTransformer(w[0])]),
                Seq([Down(w[0], w[1])]),
                Seq([Res(w[1], w[1]), SpatialTransformer(w[1])]),
                Seq([Res(w[1], w[1]), SpatialTransformer(w[1])]),
                Seq([Down(w[1], w[2])]),
                Seq([Res(w[2], w[2]), SpatialTransformer(w[2])]),
                Seq([Res(w[2], w[2]), SpatialTransformer(w[2])]),
                Seq([Down(w[2], w[3])]),
                Seq([Res(w[3], w[3])]),
                Seq([Res(w[3], w[3])]),
            ]
        )
        self.middle_block = Seq([Res(w[3], w[3]), SpatialTransformer(w[3]), Res(w[3], w[3])])
        levels = [3, 3, 3, 2, 2, 2, 1, 1, 1, 0, 0, 0]
        blocks = []
        for j, level in enumerate(levels):
            parts: list[nn.Module] = [Res(w[level], w[level])]
            if level < 3:
                parts.append(SpatialTransformer(w[level]))
            if j in (2, 5, 8):
                parts.append(Up(w[level], w[level - 1]))
            blocks.append(Seq(parts))
        self.output_blocks = nn.ModuleList(blocks)
        self.out = nn.Conv2d(w[0], 4, 3, padding=1)

    def forward(self, x, timesteps=None, context=None, **kwargs):
        t = torch.zeros(x.shape[0]) if timesteps is None else timesteps.float().expand(x.shape[0])
        emb = self.time_embed((t / 1000.0)[:, None])
        hs = []
        h = x
        for i, block in enumerate(self.input_blocks):
            h = block(h, context)
            if i == 0:
                h = h + emb[:, :, None, None]
            hs.append(h)
        h = self.middle_block(h, context)
        for block in self.output_blocks:
            skip = hs.pop()
            if h.shape[-2:] != skip.shape[-2:]:
                h = F.interpolate(h, size=skip.shape[-2:], mode="nearest")
            h = block(h + skip, context)
        return self.out(h)


class _Conv(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1)

    def forward(self, x, context):
        return self.conv(x)


def attn2_paths(unet: nn.Module) -> list[str]:
    return [name for name, module in unet.named_modules() if name.endswith("attn2")]


def level_of(n_tokens: int, latent_hw: tuple[int, int]) -> int:
    h, w = latent_hw
    return round(math.log2(math.sqrt(h * w / n_tokens)))
