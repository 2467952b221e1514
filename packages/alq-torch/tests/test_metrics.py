"""Measured error metrics (alq_torch.error_metrics) against a slow, obviously-correct reference."""

from __future__ import annotations

import math

import alq_torch
import numpy as np
import pytest
import torch
from alq_torch import ErrorMetrics, error_metrics, top_mask
from alq_torch._metrics import top_count


def _reference(deq: np.ndarray, g: np.ndarray, fraction: float, layers: list[tuple[str, int]] | None) -> dict:  # type: ignore[type-arg]
    """Python loops over workers and coordinates, float64, straight from the definitions."""
    k, n = g.shape
    m = max(1, math.ceil(fraction * n))
    var, top, share = [], [], []
    for w in range(k):
        err = [float(deq[w, i]) - float(g[w, i]) for i in range(n)]
        order = sorted(range(n), key=lambda i: -abs(float(g[w, i])))[:m]
        e_all = sum(e * e for e in err)
        g_all = sum(float(x) ** 2 for x in g[w])
        e_top = sum(err[i] ** 2 for i in order)
        g_top = sum(float(g[w, i]) ** 2 for i in order)
        if g_all > 0:
            var.append(e_all / g_all)
        if g_top > 0:
            top.append(e_top / g_top)
        if e_all > 0:
            share.append(e_top / e_all)
    mean_q = [sum(float(deq[w, i]) for w in range(k)) / k for i in range(n)]
    mean_g = [sum(float(g[w, i]) for w in range(k)) / k for i in range(n)]
    avg = sum((a - b) ** 2 for a, b in zip(mean_q, mean_g)) / sum(b * b for b in mean_g)
    out = {
        "variance": float(np.mean(var)),
        "top_error": float(np.mean(top)),
        "top_share": float(np.mean(share)),
        "avg_error": avg,
    }
    if layers is not None:
        per = {}
        off = 0
        for name, size in layers:
            ratios, any_error = [], False
            for w in range(k):
                num = sum((float(deq[w, i]) - float(g[w, i])) ** 2 for i in range(off, off + size))
                den = sum(float(g[w, i]) ** 2 for i in range(off, off + size))
                any_error = any_error or num > 0
                if den > 0:
                    ratios.append(num / den)
            # No worker with a nonzero denominator: 0 without error (an empty layer), else undefined.
            per[name] = float(np.mean(ratios)) if ratios else (float("nan") if any_error else 0.0)
            off += size
        out["layers"] = per
    return out


def _data(k: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(k, n, generator=gen) * torch.exp(1.5 * torch.randn(n, generator=gen))
    deq = g + 0.3 * torch.randn(k, n, generator=gen) * g.abs().mean()
    return deq, g


@pytest.mark.parametrize(("k", "n", "fraction", "seed"), [(4, 1000, 0.01, 0), (3, 257, 0.01, 1), (2, 50, 0.1, 2)])
def test_metrics_match_the_reference(k: int, n: int, fraction: float, seed: int) -> None:
    deq, g = _data(k, n, seed)
    sizes = [n // 3, 1, n // 5, 0, n - n // 3 - 1 - n // 5]
    layers = [(f"l{i}", s) for i, s in enumerate(sizes)]
    got = error_metrics(deq, g, fraction=fraction, layers=layers)
    want = _reference(deq.numpy(), g.numpy(), fraction, layers)
    for key in ("variance", "top_error", "top_share", "avg_error"):
        assert getattr(got, key) == pytest.approx(want[key], rel=1e-10), key
    assert list(got.layers) == [name for name, _ in layers]
    assert got.layers["l3"] == 0.0  # an empty layer: no error
    for name, val in want["layers"].items():
        assert got.layers[name] == pytest.approx(val, rel=1e-10), name


def test_variance_is_the_simulators_normalized_variance() -> None:
    deq, g = _data(5, 600, 3)
    assert error_metrics(deq, g).variance == pytest.approx(
        alq_torch.SimulatedWorkers.normalized_variance(deq, g), rel=1e-14
    )


def test_zero_rows_and_exact_input() -> None:
    deq, g = _data(3, 400, 4)
    g[1] = 0
    deq[1] = 0
    got = error_metrics(deq, g)
    want = _reference(deq.numpy(), g.numpy(), 0.01, None)
    assert got.variance == pytest.approx(want["variance"], rel=1e-10)
    assert got.top_error == pytest.approx(want["top_error"], rel=1e-10)
    exact = error_metrics(g, g, layers=[("a", 100), ("b", 300)])
    assert exact.variance == exact.top_error == exact.avg_error == 0.0
    assert math.isnan(exact.top_share)  # no error energy: its share is undefined
    assert exact.layers == {"a": 0.0, "b": 0.0}
    dead = g.clone()
    dead[:, :100] = 0  # a layer with no gradient but quantization noise: its ratio is undefined
    assert math.isnan(error_metrics(deq, dead, layers=[("dead", 100), ("rest", 300)]).layers["dead"])
    zero = error_metrics(torch.zeros(2, 10), torch.zeros(2, 10))
    assert zero.variance == zero.top_error == zero.avg_error == 0.0


def test_top_mask_marks_each_rows_largest_magnitudes() -> None:
    g = torch.tensor([[0.1, -5.0, 2.0, 0.0, -3.0], [1.0, 2.0, 3.0, 4.0, -9.0]])
    mask = top_mask(g, fraction=0.4)
    assert mask.tolist() == [[False, True, False, False, True], [False, False, False, True, True]]
    assert top_count(1000) == 10 and top_count(1001) == 11 and top_count(5) == 1 and top_count(0) == 0
    big = torch.randn(3, 12345, generator=torch.Generator().manual_seed(0))
    m = top_mask(big)
    assert m.sum(dim=1).tolist() == [124] * 3
    for row, mrow in zip(big.abs(), m):
        assert float(row[mrow].min()) >= float(row[~mrow].max())


def test_group_error_pools_the_layers_and_worst_layer() -> None:
    deq, g = _data(2, 30, 5)
    deq[:, 10:20] = g[:, 10:20] * 3  # layer "b": relative error 4 per worker
    got = error_metrics(deq, g, layers=[("a", 10), ("b", 10), ("c", 10)])
    assert got.layers["b"] == pytest.approx(4.0)
    assert got.worst_layer() == ("b", pytest.approx(4.0))
    gn, dn = g.double().numpy(), deq.double().numpy()
    sel = np.r_[0:10, 20:30]
    want = np.mean([((dn[w, sel] - gn[w, sel]) ** 2).sum() / (gn[w, sel] ** 2).sum() for w in range(2)])
    assert got.group_error(["a", "c"]) == pytest.approx(want, rel=1e-12)
    assert math.isnan(got.group_error([]))
    with pytest.raises(KeyError, match=r"unknown layer names \['zz'\]"):
        got.group_error(["zz"])
    with pytest.raises(ValueError, match=r"no per-layer data"):
        error_metrics(deq, g).group_error(["a"])


def test_bad_input_is_rejected_with_a_clear_message() -> None:
    deq, g = _data(2, 20, 6)
    with pytest.raises(ValueError, match=r"must have the same shape \(K, n\); got \(2, 20\) and \(2, 19\)"):
        error_metrics(deq, g[:, :19])
    with pytest.raises(ValueError, match=r"sizes must add up to the gradient length n=20; got 15"):
        error_metrics(deq, g, layers=[("a", 10), ("b", 5)])
    with pytest.raises(ValueError, match=r"names must be unique"):
        error_metrics(deq, g, layers=[("a", 10), ("a", 10)])
    with pytest.raises(TypeError, match=r"sequence of \(name, numel\) pairs"):
        error_metrics(deq, g, layers=[("a", 10, 1)])  # type: ignore[list-item]
    with pytest.raises(ValueError, match=r"`fraction` must be a number in \(0, 1\]; got 0"):
        error_metrics(deq, g, fraction=0)


def test_public_names() -> None:
    for name in ("ErrorMetrics", "error_metrics", "exact_mask_from_params", "top_mask"):
        assert name in alq_torch.__all__
    assert alq_torch.__all__ == sorted(alq_torch.__all__)
    assert isinstance(error_metrics(*_data(2, 10, 7)), ErrorMetrics)
