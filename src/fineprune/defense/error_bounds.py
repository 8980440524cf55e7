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

import math
import operator

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
    """Unit roundoff of the products actually used (TF32 / bfloat16 matmul modes round coarser)."""
    if dtype == torch.float64:
        return 2.0**-53
    if dtype != torch.float32:
        return math.inf
    precise = torch.get_float32_matmul_precision() == "highest"
    if torch.cuda.is_available():
        precise = precise and not torch.backends.cuda.matmul.allow_tf32
    return 2.0**-24 if precise else 2.0**-8


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
        if node.target in (operator.add, torch.add):
            return len(node.args) == 2 and not node.kwargs
        if node.target in (torch.flatten, F.relu, torch.relu):
            return not node.kwargs.get("inplace", False)
        return False
    if node.op == "call_method":
        return node.target in ("flatten", "relu")
    return False


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
        elif node.target in (operator.add, torch.add):
            (va, da), (vb, db) = (env[a] if isinstance(a, fx.Node) else _const(a) for a in node.args)
            ma, mb = (va.abs(), vb.abs()) if values else (va, vb)
            d_out = da + db + 2 * u * (ma + mb + da + db)
            env[node] = (va + vb if values else (ma + mb) * (1 + u)), d_out
        else:  # flatten / relu in function or method form, extra args constant
            v, d = env[node.args[0]]
            fn = (lambda t: getattr(t, node.target)(*node.args[1:], **node.kwargs)) \
                if node.op == "call_method" else (lambda t: node.target(t, *node.args[1:], **node.kwargs))
            env[node] = fn(v), fn(d)
    raise ValueError("tail graph has no output")


def _const(a: object) -> Bound:
    v = abs(float(a))
    return torch.tensor(v), torch.tensor(0.0)


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
