"""§3 pivot rules on hand-made series, and online == offline on recorded series."""

from __future__ import annotations

import pytest
import torch

from structkv.methods import SnapKV
from structkv.pivot import (
    OnlinePivot,
    metric_scales,
    offline_pivot,
    search_range,
    transition_scores,
)


def test_offline_argmax_rule_is_argmax_plus_one():
    t = [0.0, 0.1, 0.3, 0.9, 0.4, 0.2, 0.1, 0.05, 0.0, 0.0]
    assert offline_pivot(t, 1, 8, "argmax") == 4  # argmax at layer 3
    # The range bounds the search: a bigger peak outside [l_min, l_max-1] is ignored.
    assert offline_pivot([0, 5.0, 0.1, 0.2, 0.3, 0.1, 9.0, 0], 2, 6) == 5


def test_offline_stabilised_rule_waits_for_the_transition_to_end():
    t = [0.0, 0.1, 0.5, 1.0, 0.6, 0.3, 0.15, 0.1, 0.0, 0.0]
    # max |T| = 1.0 in range; first layer after the peak (3) with |T| <= 0.2 is layer 6.
    assert offline_pivot(t, 1, 8, "stabilised", tau=0.2) == 6
    assert offline_pivot(t, 1, 8, "stabilised", tau=0.5) == 5


def test_transition_score_by_hand():
    metrics = [(3.0, 0.2, 1.0), (2.0, 0.4, 1.5), (1.0, 0.5, 3.0)]
    # grads of (-H, rho, V): layer1 (1, .2, .5), layer2 (1, .1, 1.5); scales (1, .2, 1.5)
    assert metric_scales(metrics) == pytest.approx((1.0, 0.2, 1.5))
    t = transition_scores(metrics)
    assert t[0] == 0.0
    assert t[1] == pytest.approx(0.2 * 1 + 0.3 * 1.0 + 0.5 * (0.5 / 1.5))
    assert t[2] == pytest.approx(0.2 * 1 + 0.3 * 0.5 + 0.5 * 1.0)


def _online(metrics, l_min, l_max, rule, scales):
    online = OnlinePivot(l_min, l_max, rule=rule, scales=scales)
    for m in metrics:
        decided = online.observe(m)
        if decided is not None:
            return decided
    raise AssertionError("online pivot never decided")


def _series_from_scores(scores):
    """Metrics whose variance gradient alone reproduces ``scores`` (entropy, sparsity flat)."""
    v, out = 0.0, [(1.0, 0.5, 0.0)]
    for s in scores[1:]:
        v += s
        out.append((1.0, 0.5, v))
    return out


@pytest.mark.parametrize("rule", ["argmax", "stabilised"])
@pytest.mark.parametrize(
    "scores",
    [
        [0, 0.1, 0.3, 0.9, 0.4, 0.2, 0.1, 0.05, 0.02, 0.01],
        [0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9],  # no peak: falls back to l_max
        [0, 0.9, 0.5, 0.3, 0.2, 0.1, 0.05, 0.0, 0.0, 0.0],
    ],
)
def test_online_equals_offline_on_unimodal_series(scores, rule):
    metrics = _series_from_scores(scores)
    scales = metric_scales(metrics)
    t = transition_scores(metrics, scales)
    assert offline_pivot(t, 1, 8, rule) == _online(metrics, 1, 8, rule, scales)


@pytest.mark.parametrize("seed", range(4))
def test_online_rule_on_recorded_model_series(seed):
    """Replay real per-layer metrics: the online rule commits at a layer where T has just
    fallen from a running maximum (or at l_max), never later than the offline argmax pivot,
    and it is the first such layer (it never waits past a qualifying drop)."""
    from structkv.models import tiny_model

    lm = tiny_model("tiny-llama", num_layers=12, seed=seed)
    ids = torch.randint(0, 256, (96,), generator=torch.Generator().manual_seed(seed))
    stats = SnapKV().prefill(lm.model, ids).stats
    metrics = list(zip(stats.entropy, stats.sparsity, stats.variance))
    assert len(metrics) == 12
    scales = metric_scales(metrics)
    t = transition_scores(metrics, scales)
    l_min, l_max = search_range(12)
    online = _online(metrics, l_min, l_max, "argmax", scales)
    offline = offline_pivot(t, l_min, l_max)
    assert l_min < online <= offline <= l_max

    def drop_after_running_max(layer: int) -> bool:
        return t[layer] < t[layer - 1] and t[layer - 1] >= max(t[l_min:layer])

    assert online == l_max or drop_after_running_max(online)
    assert not any(drop_after_running_max(layer) for layer in range(l_min + 1, online))


def test_search_range_default():
    """[floor(0.2 L), floor(0.7 L)] with l_min >= 1 and l_max >= 2 (method.md §3/§6)."""
    assert search_range(30) == (6, 21)
    assert search_range(10) == (2, 7)
    assert search_range(4) == (1, 2)  # 0.2·4 floors to 0: T_0 is undefined, so 1
    assert search_range(2) == (1, 2)
