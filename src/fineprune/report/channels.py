"""Where does the backdoor live? Per-channel activation of clean vs triggered validation inputs,
summarised against the pruning order (the paper's explanation of when pruning alone works)."""
from __future__ import annotations

from ..defense.sweep import SweepCurve


def channel_findings(curve: SweepCurve, stop_k: int, top: int = 5, dormant_rel: float = 0.01) -> dict:
    """Summary of a sweep's channel statistics.

    - `dormant_clean`: channels whose clean mean is at most `dormant_rel` of the largest;
    - `trigger_gap_pruned_share`: of the total excess activation triggered inputs cause
      (sum over channels of max(0, triggered - clean)), the share held by the channels the stop
      rule pruned: near 1, the backdoor sat in prunable channels; near 0, in clean-active ones,
      where pruning alone cannot reach it;
    - `top_trigger_channels`: the `top` channels with the largest excess, with their place in the
      pruning order and whether they were pruned."""
    order, clean = curve.order, curve.channel_means
    rank = {c: i for i, c in enumerate(order)}
    peak = max(clean) if clean else 0.0
    out: dict = {"layer": curve.layer, "num_channels": len(order), "stop_k": stop_k,
                 "dormant_clean": sum(1 for v in clean if v <= dormant_rel * peak)}
    if curve.triggered_means is None:
        return out
    trig = curve.triggered_means
    gap = [max(0.0, t - c) for t, c in zip(trig, clean)]
    total = sum(gap)
    pruned = set(order[:stop_k])
    out["trigger_gap_pruned_share"] = round(sum(gap[c] for c in pruned) / total, 4) if total > 0 else None
    best = sorted(range(len(gap)), key=lambda c: (-gap[c], c))[:top]
    out["top_trigger_channels"] = [
        {"channel": c, "prune_rank": rank[c], "pruned": c in pruned, "clean_mean": round(clean[c], 5),
         "triggered_mean": round(trig[c], 5)} for c in best]
    return out
