"""Models written the way Hugging Face and YOLOv5 write them, which torch.fx cannot trace whole.

``BertStyleModel``: a BERT-style encoder (embeddings sliced by a traced length, tuple unpacking of sizes,
attention-mask arithmetic with ``torch.finfo``, dict and dataclass outputs, keyword-only flags, branches on
``output_hidden_states``). ``Detector``: a YOLO-style detector (a data-dependent branch at the root, a head that
loops over feature maps, caches anchor grids and decodes only when not training). ``NeckHead``: traceable at the
root, with that head inside. Used by tests and ``benchmarks/untraceable_models.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


# ---- a BERT-style encoder, written the way Hugging Face writes them -----------------------------------------
@dataclass
class EncoderOutput:  # ModelOutput-like
    last_hidden_state: torch.Tensor
    pooler_output: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


class Embeddings(nn.Module):
    def __init__(self, vocab: int, hidden: int, max_len: int) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab, hidden)
        self.position_embeddings = nn.Embedding(max_len, hidden)
        self.LayerNorm = nn.LayerNorm(hidden)
        self.dropout = nn.Dropout(0.1)
        self.register_buffer("position_ids", torch.arange(max_len).expand((1, -1)), persistent=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        seq_length = input_ids.size(1)
        position_ids = self.position_ids[:, :seq_length]
        x = self.word_embeddings(input_ids) + self.position_embeddings(position_ids)
        return self.dropout(self.LayerNorm(x))


class SelfAttention(nn.Module):
    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.num_attention_heads = heads
        self.attention_head_size = hidden // heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)
        self.dropout = nn.Dropout(0.1)

    def forward(self, hidden_states, attention_mask=None, *, output_attentions: bool = False):
        b, s, _ = hidden_states.size()
        q = self.query(hidden_states).view(b, s, self.num_attention_heads, self.attention_head_size).transpose(1, 2)
        k = self.key(hidden_states).view(b, s, self.num_attention_heads, self.attention_head_size).transpose(1, 2)
        v = self.value(hidden_states).view(b, s, self.num_attention_heads, self.attention_head_size).transpose(1, 2)
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.attention_head_size)
        if attention_mask is not None:
            if attention_mask.dtype == torch.bool:  # torch.fx cannot branch on a traced dtype
                attention_mask = attention_mask.logical_not() * torch.finfo(scores.dtype).min
            scores = scores + attention_mask
        probs = self.dropout(F.softmax(scores, dim=-1))
        context = torch.matmul(probs, v).transpose(1, 2).contiguous()
        context = context.view(b, s, self.num_attention_heads * self.attention_head_size)
        return (context, probs) if output_attentions else (context,)


class Layer(nn.Module):
    def __init__(self, hidden: int, heads: int, inter: int) -> None:
        super().__init__()
        self.attention = SelfAttention(hidden, heads)
        self.attention_output = nn.Linear(hidden, hidden)
        self.ln1 = nn.LayerNorm(hidden)
        self.intermediate = nn.Linear(hidden, inter)
        self.output = nn.Linear(inter, hidden)
        self.ln2 = nn.LayerNorm(hidden)

    def forward(self, hidden_states, attention_mask=None, output_attentions: bool = False):
        outputs = self.attention(hidden_states, attention_mask, output_attentions=output_attentions)
        h = self.ln1(hidden_states + self.attention_output(outputs[0]))
        h = self.ln2(h + self.output(F.gelu(self.intermediate(h))))
        return (h,) + outputs[1:]  # noqa: RUF005 (as Hugging Face writes it)


class Encoder(nn.Module):
    def __init__(self, hidden: int, heads: int, inter: int, layers: int) -> None:
        super().__init__()
        self.layer = nn.ModuleList([Layer(hidden, heads, inter) for _ in range(layers)])

    def forward(self, hidden_states, attention_mask=None, *, output_attentions: bool = False,
                output_hidden_states: bool = False, return_dict: bool = True):
        all_hidden = () if output_hidden_states else None
        all_attn = () if output_attentions else None
        for layer in self.layer:
            if output_hidden_states:
                all_hidden = (*all_hidden, hidden_states)
            outputs = layer(hidden_states, attention_mask, output_attentions)
            hidden_states = outputs[0]
            if output_attentions:
                all_attn = (*all_attn, outputs[1])
        if not return_dict:
            return tuple(v for v in (hidden_states, all_hidden, all_attn) if v is not None)
        return {"last_hidden_state": hidden_states, "hidden_states": all_hidden, "attentions": all_attn}


class BertStyleModel(nn.Module):
    def __init__(self, vocab: int = 50, hidden: int = 32, heads: int = 4, inter: int = 64, layers: int = 2,
                 max_len: int = 16) -> None:
        super().__init__()
        self.embeddings = Embeddings(vocab, hidden, max_len)
        self.encoder = Encoder(hidden, heads, inter, layers)
        self.pooler = nn.Linear(hidden, hidden)

    def forward(self, input_ids, attention_mask=None, *, output_attentions: bool = False,
                output_hidden_states: bool = False):
        batch_size, seq_length = input_ids.size()
        if attention_mask is None:
            attention_mask = torch.ones(batch_size, seq_length)
        dtype = self.pooler.weight.dtype
        extended = (1.0 - attention_mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min
        h = self.embeddings(input_ids)
        enc = self.encoder(h, extended, output_attentions=output_attentions,
                           output_hidden_states=output_hidden_states)
        sequence_output = enc["last_hidden_state"]
        pooled = torch.tanh(self.pooler(sequence_output[:, 0]))
        if output_hidden_states and sequence_output.abs().sum() > 0:  # a data-dependent branch at the root
            pooled = pooled * 1.0
        return EncoderOutput(sequence_output, pooled, enc["hidden_states"], enc["attentions"])


def bert_inputs(batch: int = 4, seq: int = 12, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 50, (batch, seq), generator=g)
    mask = torch.ones(batch, seq)
    mask[:, seq - 3:] = 0.0  # padding
    return ids, mask


# ---- a YOLO-style detector -------------------------------------------------------------------------------
class ConvBnSiLU(nn.Module):
    def __init__(self, cin: int, cout: int, k: int = 3, s: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, s, k // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.act = nn.SiLU()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class Backbone(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = ConvBnSiLU(3, 8, 3, 2)
        self.stage1 = nn.Sequential(ConvBnSiLU(8, 16, 3, 2), ConvBnSiLU(16, 16))
        self.stage2 = nn.Sequential(ConvBnSiLU(16, 32, 3, 2), ConvBnSiLU(32, 32))

    def forward(self, x):
        p3 = self.stage1(self.stem(x))
        p4 = self.stage2(p3)
        return [p3, p4]


class Neck(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Upsample(scale_factor=2.0, mode="nearest")
        self.fuse = ConvBnSiLU(48, 16, 1)

    def forward(self, feats):
        p3, p4 = feats
        return [self.fuse(torch.cat([p3, self.up(p4)], 1)), p4]


class Detect(nn.Module):
    """YOLOv5's head: per-level 1x1 convs, anchor grids cached across calls, decoding only at inference."""

    def __init__(self, nc: int = 3, channels: tuple[int, ...] = (16, 32), strides: tuple[float, ...] = (4.0, 8.0)):
        super().__init__()
        self.nc, self.no, self.na, self.nl = nc, nc + 5, 2, len(channels)
        self.stride = strides
        self.m = nn.ModuleList(nn.Conv2d(c, self.no * self.na, 1) for c in channels)
        self.grid = [torch.empty(0) for _ in range(self.nl)]
        self.register_buffer("anchors", torch.tensor([[[1.0, 2.0], [2.0, 1.0]], [[2.0, 4.0], [4.0, 2.0]]]))

    def forward(self, x: list[torch.Tensor]):
        z = []
        for i in range(self.nl):
            x[i] = self.m[i](x[i])
            bs, _, ny, nx = x[i].shape
            x[i] = x[i].view(bs, self.na, self.no, ny, nx).permute(0, 1, 3, 4, 2).contiguous()
            if not self.training:
                if self.grid[i].shape[2:4] != x[i].shape[2:4]:  # the cache: torch.fx cannot branch on shapes
                    yv, xv = torch.meshgrid(torch.arange(ny), torch.arange(nx), indexing="ij")
                    self.grid[i] = torch.stack((xv, yv), 2).view(1, 1, ny, nx, 2).float()
                y = x[i].sigmoid()
                xy = (y[..., 0:2] * 2 - 0.5 + self.grid[i]) * self.stride[i]
                wh = (y[..., 2:4] * 2) ** 2 * self.anchors[i].view(1, self.na, 1, 1, 2)
                z.append(torch.cat((xy, wh, y[..., 4:]), -1).view(bs, -1, self.no))
        return x if self.training else torch.cat(z, 1)


class Detector(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = Backbone()
        self.neck = Neck()
        self.detect = Detect()

    def forward(self, x, augment: bool = False):
        if x.abs().sum() == 0:  # data-dependent: an all-black frame has no detections
            return torch.zeros(x.shape[0], 0, self.detect.no)
        feats = self.neck(self.backbone(x))
        return self.detect(feats)


class NeckHead(nn.Module):
    """Traceable at the root; its Detect head is not."""

    def __init__(self) -> None:
        super().__init__()
        self.neck = Neck()
        self.detect = Detect()

    def forward(self, p3, p4):
        return self.detect(self.neck([p3, p4]))


def feature_maps(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 16, 16, 16, generator=g), torch.randn(2, 32, 8, 8, generator=g)


def randomize_bn(model: nn.Module, seed: int = 1) -> nn.Module:
    """BatchNorm statistics and scales as a trained model has them (so that folding matters); eval mode."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) * 1.5 + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model.eval()
