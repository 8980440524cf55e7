"""Rigorous float rounding bounds for the incremental sweep: when may a fast logit be trusted?

Standard forward error analysis (Higham, "Accuracy and Stability of Numerical Algorithms", ch. 3):
a sum of n products plus a bias, computed in any order, with or without FMA, is off by at most
gamma(n+1) * (|b| + sum |w||x|), gamma(n) = n u / (1 - n u), u the unit roundoff. We propagate,
per sample and per element, two non-negative tensors through the head's tail:

* M bounds |exact value| for every k (pruning only removes terms, so unpruned magnitudes bound all
  k), or, for a given (k, sample), the fast path's actual values stand in for it;
* D bounds |fast value - exact| + |full-pass value - exact|, so |fast - full| <= D.

1-Lipschitz element-wise maps and max-pooling keep (M, D); linear maps take D to |W| D plus both
paths' own rounding. A prediction whose top-2 logit margin exceeds D[i] + D[j] is the full pass's.
"""
from __future__ import annotations

import contextlib
import math
import operator
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import fx, nn

Bound = tuple[torch.Tensor, torch.Tensor]  # (M, D)

_KEEPS_BOUND = (
    nn.ReLU, nn.ReLU6, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d, nn.Flatten,
)
_AVG_POOLS = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
              nn.AdaptiveAvgPool3d)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def unit_roundoff(dtype: torch.dtype) -> float:
    """Unit roundoff of the products actually used: TF32 (CUDA matmuls, cuDNN convolutions) and
    bfloat16 matmul modes round float32 operands to 8 significant bits, so they get 2^-8.
    The sweep runs under `exact_float32()`, which turns those modes off, so it certifies with 2^-24."""
    if dtype == torch.float64:
        return 2.0**-53
    if dtype != torch.float32:
        return math.inf
    return 2.0**-8 if _float32_shortcuts() else 2.0**-24


def _precision_backends() -> list[object]:
    """The backends with a per-backend float32 precision (torch >= 2.9); CUDA's only when in use."""
    b = torch.backends
    names = [(b, "mkldnn", "matmul"), (b, "mkldnn", "conv")]
    if torch.cuda.is_available():
        names += [(b, "cuda", "matmul"), (b, "cudnn", "conv")]
    found = []
    for root, a, c in names:
        obj = getattr(getattr(root, a, None), c, None)
        if obj is not None and hasattr(obj, "fp32_precision"):
            found.append(obj)
    return found


def _legacy_matmul_precision() -> str | None:
    try:  # raises once the newer per-backend API has been used
        return torch.get_float32_matmul_precision()
    except RuntimeError:
        return None


def _float32_shortcuts() -> bool:
    """Whether any float32 product may be rounded to TF32 / bfloat16 (checked both APIs; a setting
    that cannot be read counts as on, so the certificate errs on the safe side)."""
    if any(obj.fp32_precision in ("tf32", "bf16") for obj in _precision_backends()):
        return True
    legacy = _legacy_matmul_precision()
    if legacy not in (None, "highest"):
        return True
    if torch.cuda.is_available() and not _precision_backends():  # torch without the newer API
        return bool(torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32)
    return False


@contextlib.contextmanager
def exact_float32() -> Iterator[None]:
    """float32 products in float32 (no TF32 / bfloat16 shortcuts) inside the block, restored after.

    cuDNN allows TF32 convolutions by default: a sweep on a GPU would otherwise compare paths that
    each round to 8 bits. Both the cached sweep and the full-pass reference run under this.
    Whatever cannot be turned off is seen by `unit_roundoff`, which then certifies less."""
    backends = _precision_backends()
    saved = [obj.fp32_precision for obj in backends]
    legacy = _legacy_matmul_precision()
    try:
        for obj in backends:
            obj.fp32_precision = "ieee"
        if legacy not in (None, "highest"):
            torch.set_float32_matmul_precision("highest")
        yield
    finally:
        for obj, value in zip(backends, saved):
            obj.fp32_precision = value
        if legacy not in (None, "highest"):
            torch.set_float32_matmul_precision(legacy)


def gamma(n: int, u: float) -> float:
    return n * u / (1 - n * u) if n * u < 0.5 else math.inf


def supported(node: fx.Node, mods: dict[str, nn.Module]) -> bool:
    """Whether `propagate` knows how rounding behaves in this tail node."""
    if node.op in ("placeholder", "output"):
        return True
    if node.op == "call_module":
        m = mods.get(node.target)
        if isinstance(m, nn.LeakyReLU):
            return 0.0 <= m.negative_slope <= 1.0
        if isinstance(m, _CONVS):
            return m.padding_mode == "zeros"
        if isinstance(m, _BATCHNORMS):  # per-sample only with running statistics, in eval mode
            return m.running_mean is not None and not m.training
        return isinstance(m, (*_KEEPS_BOUND, *_AVG_POOLS, nn.Linear)) and not getattr(m, "return_indices", False)
    if node.op == "call_function":
        if node.target in _ARITH_FUNCTIONS:
            return _arith_supported(_ARITH_FUNCTIONS[node.target], node)
        if node.target in (torch.flatten, F.relu, torch.relu):
            return not node.kwargs.get("inplace", False)
        return False
    if node.op == "call_method":
        if node.target in _ARITH_METHODS:
            return _arith_supported(node.target, node)
        return node.target in ("flatten", "relu")
    return False


# Element-wise arithmetic the tail may hold (a bias added as a constant, a scale, a subtraction).
_ARITH_FUNCTIONS = {
    operator.add: "add", torch.add: "add", operator.sub: "sub", torch.sub: "sub",
    operator.mul: "mul", torch.mul: "mul", operator.truediv: "div", torch.div: "div",
    operator.neg: "neg", torch.neg: "neg",
}
_ARITH_METHODS = {"add", "sub", "mul", "div", "neg"}


def _is_number(a: object) -> bool:
    return isinstance(a, (int, float)) and not isinstance(a, bool) and math.isfinite(a)


def _arith_supported(op: str, node: fx.Node) -> bool:
    """Two operands (tensors or finite numbers) for add/sub; a tensor times or over a nonzero
    number for mul/div (a product of two tensors is not bounded here); one tensor for neg."""
    if node.kwargs:
        return False
    args = node.args
    if op == "neg":
        return len(args) == 1 and isinstance(args[0], fx.Node)
    if len(args) != 2 or not all(isinstance(a, fx.Node) or _is_number(a) for a in args):
        return False
    tensors = sum(isinstance(a, fx.Node) for a in args)
    if op in ("add", "sub"):
        return tensors >= 1
    if op == "mul":
        return tensors == 1
    return isinstance(args[0], fx.Node) and _is_number(args[1]) and args[1] != 0  # div


def linear_bound(m: torch.Tensor, d: torch.Tensor, apply_abs, bias: torch.Tensor | None,
                 terms: int, u: float, need_mag: bool = True) -> Bound:
    """Through y = W x + b, where `apply_abs(v)` computes |W| v (no bias):
    D' = |W| D + 2 gamma (|W| (M + D) + |b|), evaluated as one product by linearity."""
    g = gamma(terms + 1, u)
    b = bias.abs().view(-1, *([1] * (m.dim() - 2))) if bias is not None else 0.0
    dev = (apply_abs((1 + 2 * g) * d + 2 * g * m) + 2 * g * b) * (1 + g)
    mag = (apply_abs(m) + b) * (1 + g) if need_mag else m
    return mag, dev


def _module_bound(mod: nn.Module, m: torch.Tensor, d: torch.Tensor, u: float, need_mag: bool) -> Bound:
    if isinstance(mod, nn.Linear):
        wa = mod.weight.abs()
        return linear_bound(m, d, lambda v: F.linear(v, wa), mod.bias, mod.in_features, u, need_mag)
    if isinstance(mod, _CONVS):
        wa = mod.weight.abs()
        conv = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Conv3d: F.conv3d}[type(mod)]
        terms = wa[0].numel()
        return linear_bound(m, d, lambda v: conv(v, wa, None, mod.stride, mod.padding, mod.dilation,
                                                  mod.groups), mod.bias, terms, u, need_mag)
    if isinstance(mod, _BATCHNORMS):
        return _batchnorm_bound(mod, m, d, u)
    if isinstance(mod, _AVG_POOLS):
        g = gamma(math.prod(m.shape[2:]) + 1, u)  # a window never has more terms than the map
        return mod(m) * (1 + g), (mod(d) + 2 * g * mod(m + d)) * (1 + g)
    if isinstance(mod, nn.LeakyReLU):
        return m, d + 2 * u * (m + d)
    return mod(m), mod(d)  # 1-Lipschitz, |f(a)| <= |a|, f applied element- or window-wise


def _batchnorm_bound(bn: nn.Module, m: torch.Tensor, d: torch.Tensor, u: float) -> Bound:
    """y = (x - mean) / sqrt(var + eps) * w + b in any grouping of its ~4 roundings."""
    shape = (1, -1) + (1,) * (m.dim() - 2)
    scale = (bn.weight.abs() if bn.weight is not None else 1.0) / torch.sqrt(bn.running_var + bn.eps)
    mean = bn.running_mean.abs().view(shape)
    scale = scale.view(shape)
    shift = bn.bias.abs().view(shape) if bn.bias is not None else 0.0
    g = gamma(6, u)
    mag = scale * (m + mean) + shift
    dev = scale * d + 2 * g * (scale * (m + d + mean) + shift)
    return mag * (1 + g), dev * (1 + g)


def propagate(tail: fx.GraphModule, inputs: list[Bound], u: float, values: bool = False) -> Bound:
    """(M, D) of the tail's output given (M, D) of each of its inputs.

    With `values`, the first tensor of each pair is the fast path's actual (signed) value V
    instead of a magnitude bound: the tail is evaluated alongside and each op's rounding is
    bounded with |V| (the fast path's own operand) and |V| + D (the full pass's), which is much
    tighter than magnitudes propagated from the unpruned sums."""
    mods = dict(tail.named_modules())
    env: dict[fx.Node, Bound] = {}
    it = iter(inputs)
    for node in tail.graph.nodes:
        if node.op == "placeholder":
            env[node] = next(it)
        elif node.op == "output":
            return env[node.args[0]]
        elif node.op == "call_module":
            v, d = env[node.args[0]]
            mod = mods[node.target]
            m_out, d_out = _module_bound(mod, v.abs() if values else v, d, u, need_mag=not values)
            env[node] = (mod(v.clone() if getattr(mod, "inplace", False) else v) if values else m_out), d_out
        elif _arith_op(node) is not None:
            env[node] = _arith_bound(node, _arith_op(node), env, u, values)
        else:  # flatten / relu in function or method form, extra args constant
            v, d = env[node.args[0]]
            fn = (lambda t: getattr(t, node.target)(*node.args[1:], **node.kwargs)) \
                if node.op == "call_method" else (lambda t: node.target(t, *node.args[1:], **node.kwargs))
            env[node] = fn(v), fn(d)
    raise ValueError("tail graph has no output")


def _arith_op(node: fx.Node) -> str | None:
    if node.op == "call_function":
        return _ARITH_FUNCTIONS.get(node.target)
    if node.op == "call_method" and node.target in _ARITH_METHODS:
        return node.target
    return None


def _arith_bound(node: fx.Node, op: str, env: dict[fx.Node, Bound], u: float, values: bool) -> Bound:
    """Element-wise add / sub / scale / negate. A number operand is exact (D = 0); its magnitude
    enters M, while in values mode the op itself runs on the signed operands, so the value is the
    tail's own (a negative constant stays negative)."""
    if op == "neg":
        v, d = env[node.args[0]]
        return (-v if values else v), d
    pairs = [env[a] if isinstance(a, fx.Node) else None for a in node.args]
    mags = [(p[0].abs() if values else p[0]) if p is not None else abs(float(a))
            for p, a in zip(pairs, node.args)]
    devs = [p[1] if p is not None else 0.0 for p in pairs]
    if op in ("add", "sub"):
        # each path rounds once: |fl(a +- b) - (a +- b)| <= u (|a| + |b|), and the full pass's
        # operands are within D of the fast path's
        d_out = devs[0] + devs[1] + 2 * u * (mags[0] + mags[1] + devs[0] + devs[1])
        mag = (mags[0] + mags[1]) * (1 + u)
    else:  # mul / div by the number s: D' = |s| (D + 2u (M + D)) with |s| or 1/|s|
        i = 0 if pairs[0] is not None else 1
        s = abs(float(node.args[1 - i]))
        s = 1.0 / s if op == "div" else s
        d_out = s * (devs[i] + 2 * u * (mags[i] + devs[i])) * (1 + u)
        mag = s * mags[i] * (1 + u)
    if not values:
        return mag, d_out
    operands = [p[0] if p is not None else a for p, a in zip(pairs, node.args)]
    return node.target(*operands) if node.op == "call_function" \
        else getattr(operands[0], node.target)(*operands[1:]), d_out


def unsure(margin: torch.Tensor, winner: torch.Tensor, d_logits: torch.Tensor) -> torch.Tensor:
    """Which fast predictions might differ from the full pass's. Row r (top-2 logit `margin`,
    predicted class `winner`, from sample r % m of the m samples `d_logits` bounds) is sure when
    margin > D[winner] + max_j D[j]: then the winner also beats every class j in the full pass.
    The 1% slack covers the float evaluation of the bound itself (relative error ~ n u)."""
    m = d_logits.shape[0]
    d = d_logits.repeat(winner.shape[0] // m, 1)
    need = (d.gather(1, winner.view(-1, 1)).squeeze(1) + d.amax(dim=1)) * 1.01
    need = need + torch.finfo(d.dtype).tiny * 1e6  # underflow slack
    return ~(margin > need)  # NaN counts as unsure
