"""Standard ONNX ops (and ORT's float contrib ops) in torch, with ONNX semantics: what the rest of an ORT graph
runs besides its integer kernels. Tensor plumbing (reshape, transpose, slice, gather, concat...) is exact by
nature; float arithmetic uses torch's float32 kernels, or ``fxquant.lower.exact.floats`` where ORT's own
approximation is reproduced."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fxquant.errors import ConversionError
from fxquant.lower.exact import floats, norm
from fxquant.lower.exact.arith import sqrt32

ONNX_DTYPES = {1: torch.float32, 2: torch.uint8, 3: torch.int8, 5: torch.int16, 6: torch.int32, 7: torch.int64,
               9: torch.bool, 10: torch.float16, 11: torch.float64, 16: torch.bfloat16}


def _ints(t: torch.Tensor | None) -> list[int] | None:
    return None if t is None else [int(v) for v in t.reshape(-1).tolist()]


# ---- shapes and plumbing ---------------------------------------------------------------------------------------
def reshape(x, shape, *, allowzero: int = 0, **_):
    dims = _ints(shape)
    if not allowzero:
        dims = [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]
    return x.reshape(dims)


def transpose(x, *, perm=None, **_):
    return x.permute(*(perm if perm is not None else reversed(range(x.dim()))))


def flatten(x, *, axis: int = 1, **_):
    axis = axis % x.dim() if x.dim() else 0
    return x.reshape(math.prod(x.shape[:axis]), -1)


def squeeze(x, axes=None, **_):
    axes = _ints(axes)
    if axes is None:
        return x.squeeze()
    for a in sorted((a % x.dim() for a in axes), reverse=True):
        x = x.squeeze(a)
    return x


def unsqueeze(x, axes, **_):
    axes = _ints(axes)
    rank = x.dim() + len(axes)
    for a in sorted(a % rank for a in axes):
        x = x.unsqueeze(a)
    return x


def concat(*xs, axis: int, **_):
    return torch.cat([x for x in xs if x is not None], axis)


def split(x, sizes=None, *, axis: int = 0, num_outputs: int | None = None, **_):
    if sizes is not None:
        return tuple(torch.split(x, _ints(sizes), axis))
    length = x.shape[axis]
    return tuple(torch.split(x, math.ceil(length / num_outputs), axis))


def slice_(x, starts, ends, axes=None, steps=None, **_):
    starts, ends = _ints(starts), _ints(ends)
    axes = _ints(axes) or list(range(len(starts)))
    steps = _ints(steps) or [1] * len(starts)
    index = [slice(None)] * x.dim()
    for s, e, a, st in zip(starts, ends, axes, steps, strict=True):
        if st < 0:
            raise ConversionError("Slice with a negative step is not emulated")
        n = x.shape[a]
        s = max(0, min(n, s + n if s < 0 else s))
        e = max(0, min(n, e + n if e < 0 else e))
        index[a % x.dim()] = slice(s, e, st)
    return x[tuple(index)]


def gather(x, indices, *, axis: int = 0, **_):
    idx = indices.to(torch.int64)
    idx = torch.where(idx < 0, idx + x.shape[axis], idx)
    return torch.index_select(x, axis, idx.reshape(-1)).reshape(
        (*x.shape[:axis % x.dim()], *idx.shape, *x.shape[axis % x.dim() + 1:]))  # a scalar index: rank - 1


def gather_elements(x, indices, *, axis: int = 0, **_):
    idx = indices.to(torch.int64)
    return torch.gather(x, axis, torch.where(idx < 0, idx + x.shape[axis], idx))


def gather_nd(x, indices, *, batch_dims: int = 0, **_):
    """GatherND: ``indices[..., :k]`` index the first k axes after ``batch_dims`` batch axes."""
    idx = indices.to(torch.int64)
    k = idx.shape[-1]
    batch = x.shape[:batch_dims]
    flat_x = x.reshape(math.prod(batch), *x.shape[batch_dims:])
    flat_i = idx.reshape(math.prod(batch), -1, k)
    dims = torch.tensor(x.shape[batch_dims:batch_dims + k], dtype=torch.int64)
    flat_i = torch.where(flat_i < 0, flat_i + dims, flat_i)
    rows = [flat_x[b][tuple(flat_i[b].unbind(-1))] for b in range(flat_x.shape[0])]
    return torch.stack(rows).reshape(*idx.shape[:-1], *x.shape[batch_dims + k:])


def shape(x, *, start: int = 0, end: int | None = None, **_):
    return torch.tensor(list(x.shape)[start:end], dtype=torch.int64)


def expand(x, shape_, **_):
    target = _ints(shape_)
    return x * torch.ones(target, dtype=x.dtype) if x.dtype != torch.bool else x.expand(
        torch.broadcast_shapes(x.shape, tuple(target)))


def cast(x, *, to: int, **_):
    return x.to(ONNX_DTYPES[to])


def identity(x, **_):
    return x


def constant_of_shape(shape_, *, value=None, **_):
    fill = value if value is not None else torch.zeros(1)
    return torch.full(_ints(shape_), fill.reshape(()).item(), dtype=fill.dtype)


def range_(start, limit, delta, **_):
    return torch.arange(start.item(), limit.item(), delta.item(), dtype=start.dtype)


def where(cond, a, b, **_):
    return torch.where(cond.bool(), a, b)


def cum_sum(x, axis, *, exclusive: int = 0, reverse: int = 0, **_):
    dim = int(axis.reshape(()).item())
    y = x.flip(dim) if reverse else x
    out = torch.cumsum(y, dim, dtype=x.dtype)
    if exclusive:
        out = out - y
    return out.flip(dim) if reverse else out


def trilu(x, k=None, *, upper: int = 1, **_):
    diagonal = 0 if k is None else int(k.reshape(()).item())
    return torch.triu(x, diagonal) if upper else torch.tril(x, diagonal)


def tile(x, repeats, **_):
    return x.repeat(_ints(repeats))


def pad(x, pads, value=None, axes=None, *, mode: str = "constant", **_):
    amounts = _ints(pads)
    rank = x.dim() if axes is None else len(_ints(axes))
    dims = list(range(x.dim())) if axes is None else [a % x.dim() for a in _ints(axes)]
    full = [0] * (2 * x.dim())
    for i, d in enumerate(dims):
        full[d], full[x.dim() + d] = amounts[i], amounts[rank + i]
    torch_pads = [p for d in reversed(range(x.dim())) for p in (full[d], full[x.dim() + d])]
    if mode != "constant":
        raise ConversionError(f"Pad mode {mode!r} is not emulated")
    return F.pad(x, torch_pads, value=0.0 if value is None else float(value.reshape(()).item()))


# ---- float arithmetic ------------------------------------------------------------------------------------------
def _binary(fn):
    def op(a, b, **_):
        return fn(a, b)
    return op


def sum_(*xs, **_):
    total = xs[0]
    for x in xs[1:]:
        total = total + x
    return total


def mod(a, b, *, fmod: int = 0, **_):
    return torch.fmod(a, b) if fmod else torch.remainder(a, b)


def div(a, b, **_):
    if a.is_floating_point():
        return a / b
    return torch.div(a, b, rounding_mode="trunc")


def clip(x, lo=None, hi=None, **_):
    if lo is not None:
        x = torch.maximum(x, lo.to(x.dtype))
    if hi is not None:
        x = torch.minimum(x, hi.to(x.dtype))
    return x


def hard_sigmoid(x, *, alpha: float = 0.2, beta: float = 0.5, **_):
    a, b = torch.tensor(alpha, dtype=torch.float32), torch.tensor(beta, dtype=torch.float32)
    return torch.clamp(x * a + b, 0.0, 1.0)


def leaky_relu(x, *, alpha: float = 0.01, **_):
    return torch.where(x >= 0, x, torch.tensor(alpha, dtype=torch.float32) * x)


def softmax(x, *, axis: int = -1, target: str, **_):
    return floats.softmax(x, axis, target)


def reduce(fn):
    def op(x, axes=None, *, keepdims: int = 1, noop_with_empty_axes: int = 0, **kw):
        dims = _ints(axes) if axes is not None else kw.get("axes")
        if not dims:
            if noop_with_empty_axes:
                return x
            dims = list(range(x.dim()))
        return fn(x, dim=[d % x.dim() for d in dims], keepdim=bool(keepdims))
    return op


def matmul(a, b, **_):
    return a @ b


def gemm(a, b, c=None, *, alpha: float = 1.0, beta: float = 1.0, transA: int = 0, transB: int = 0, **_):
    y = (a.T if transA else a) @ (b.T if transB else b)
    if alpha != 1.0:
        y = y * alpha
    if c is not None:
        y = y + (c * beta if beta != 1.0 else c)
    return y


def _activation(y, name: str | None, params) -> torch.Tensor:
    if not name:
        return y
    if name == "Relu":
        return torch.relu(y)
    if name == "Clip":
        return y.clamp(params[0], params[1])
    if name == "Sigmoid":
        return floats.mlas_logistic(y)
    if name == "LeakyRelu":
        return leaky_relu(y, alpha=params[0])
    if name == "HardSigmoid":
        return hard_sigmoid(y, alpha=params[0], beta=params[1])
    if name == "Tanh":
        return floats.tanh(y)
    raise ConversionError(f"fused activation {name!r} is not emulated")


def conv(x, w, b=None, z=None, *, group: int = 1, strides=None, pads=None, dilations=None, activation=None,
         activation_params=None, auto_pad: str = "NOTSET", **_):
    if auto_pad not in ("NOTSET", "VALID"):
        raise ConversionError(f"Conv auto_pad={auto_pad!r} is not emulated")
    dims = x.dim() - 2
    pads = pads or [0] * (2 * dims)
    padding = [p for d in reversed(range(dims)) for p in (pads[d], pads[dims + d])]
    fn = (F.conv1d, F.conv2d, F.conv3d)[dims - 1]
    y = fn(F.pad(x, padding), w, b, strides or 1, 0, dilations or 1, group)
    if z is not None:
        y = y + z
    return _activation(y, activation, activation_params)


def fused_gemm(a, b, c=None, *, activation=None, activation_params=None, **kw):
    return _activation(gemm(a, b, c, **kw), activation, activation_params)


def conv_transpose(x, w, b=None, *, group: int = 1, strides=None, pads=None, dilations=None, output_padding=None,
                   **_):
    dims = x.dim() - 2
    pads = pads or [0] * (2 * dims)
    if pads[:dims] != pads[dims:]:
        raise ConversionError("ConvTranspose with asymmetric pads is not emulated")
    fn = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[dims - 1]
    return fn(x, w, b, strides or 1, pads[:dims], output_padding or 0, group, dilations or 1)


def _pool_pads(x, pads, dims, value):
    pads = pads or [0] * (2 * dims)
    padding = [p for d in reversed(range(dims)) for p in (pads[d], pads[dims + d])]
    return F.pad(x, padding, value=value)


def max_pool(x, *, kernel_shape, strides=None, pads=None, dilations=None, ceil_mode: int = 0,
             storage_order: int = 0, auto_pad: str = "NOTSET", **_):
    if auto_pad not in ("NOTSET", "VALID"):
        raise ConversionError(f"MaxPool auto_pad={auto_pad!r} is not emulated")
    dims = len(kernel_shape)
    source = x.float() if not x.is_floating_point() else x  # uint8 codes are exact in float32
    padded = _pool_pads(source, pads, dims, float("-inf"))
    fn = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[dims - 1]
    y = fn(padded, kernel_shape, strides or kernel_shape, 0, dilations or 1, bool(ceil_mode))
    return y.to(x.dtype)


def average_pool(x, *, kernel_shape, strides=None, pads=None, count_include_pad: int = 0, ceil_mode: int = 0,
                 **_):
    dims = len(kernel_shape)
    fn = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[dims - 1]
    pads = pads or [0] * (2 * dims)
    if pads[:dims] != pads[dims:]:
        raise ConversionError("AveragePool with asymmetric pads is not emulated")
    return fn(x, kernel_shape, strides or kernel_shape, pads[:dims], bool(ceil_mode), bool(count_include_pad))


def global_average_pool(x, **_):
    return x.mean(tuple(range(2, x.dim())), keepdim=True)


def batch_norm(x, scale, bias, mean, var, *, epsilon: float = 1e-5, **_):
    """ORT's BatchNormalization (Eigen, no FMA): ``x * s + (bias - mean * s)`` with
    ``s = (1 / sqrt(var + eps)) * scale`` per channel, each step rounded to float32 (bit for bit)."""
    shape = [1, -1] + [1] * (x.dim() - 2)
    inv_std = torch.ones(()) / sqrt32(var.float() + torch.tensor(epsilon, dtype=torch.float32))
    new_scale = inv_std * scale.float()
    new_bias = bias.float() - mean.float() * new_scale
    return x.float() * new_scale.reshape(shape) + new_bias.reshape(shape)


def layer_norm(x, scale, bias=None, *, axis: int = -1, epsilon: float = 1e-5, **_):
    dims = list(range(axis % x.dim(), x.dim()))
    return norm.layer_norm(x, scale, bias, dims, epsilon)


def gelu(x, **_):
    return floats.gelu(x)


def erf(x, **_):
    return floats.erf(x)


def multi_head_attention(query, key, value, bias=None, key_padding_mask=None, attention_bias=None, *args,
                         num_heads: int, scale: float | None = None, target: str, **_):
    if bias is not None or key_padding_mask is not None or args:
        raise ConversionError("MultiHeadAttention with a packed bias, key padding mask or past state is not "
                              "emulated (fxquant writes query, key, value and an attention bias)")
    heads = num_heads
    width = query.shape[-1]
    factor = scale if scale else 1.0 / math.sqrt(width // heads)
    return floats.multi_head_attention(query, key, value, attention_bias, heads, factor, target)
