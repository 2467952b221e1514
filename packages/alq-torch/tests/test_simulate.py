"""SimulatedWorkers: the paper's K simulated workers (quantize each, average)."""

from __future__ import annotations

import alq_core
import alq_torch
import numpy as np
import pytest
import torch
from alq_torch import SimulatedWorkers

ADAPTIVE = ("alq", "alq-n", "amq", "amq-n")


def _grads(k: int = 4, n: int = 4096, seed: int = 0) -> torch.Tensor:
    """Gradient-like rows: Gaussian coordinates with a heavy spread of magnitudes."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.exp(2.0 * torch.randn(n, generator=g))
    return torch.randn(k, n, generator=g) * scale * 1e-3


def _sim(method: str, bucket: int = 1024, seed: int = 0, bits: int = 3) -> SimulatedWorkers:
    return SimulatedWorkers(alq_core.QuantizerConfig(method, bits=bits, bucket_size=bucket), seed=seed)


def test_fp32_is_the_exact_mean_with_zero_variance() -> None:
    grads = _grads()
    out = _sim("fp32").reduce(grads, step=0, measure=True)
    torch.testing.assert_close(out.mean, grads.mean(0), rtol=0, atol=0)
    assert out.variance == 0.0
    assert out.quantize_seconds == 0.0


@pytest.mark.parametrize("n", [4096, 3000])
def test_batched_call_matches_one_quantize_per_worker_on_the_same_noise(n: int) -> None:
    # Aligned (n % d == 0) and zero-padded (n % d != 0, no clipping) single-call paths.
    grads = _grads(n=n)
    sim = _sim("nuqsgd", bucket=1024, seed=7)
    deq = sim.dequantized(grads)
    d = 1024
    n_pad = -(-n // d) * d
    noise = torch.rand(grads.shape[0] * n_pad, generator=torch.Generator().manual_seed(7))
    levels = alq_core.default_levels(sim.config)
    for k in range(grads.shape[0]):
        q = alq_torch.quantize(grads[k], levels, sim.config, noise=noise[k * n_pad : k * n_pad + n])
        torch.testing.assert_close(deq[k], alq_torch.dequantize(q, levels), rtol=0, atol=0)


def test_clipped_unaligned_method_loops_per_worker_on_the_same_noise() -> None:
    grads = _grads(n=3000)
    sim = _sim("trn", bucket=1024, seed=3)
    assert sim.config.clip == 2.5
    deq = sim.dequantized(grads)
    gen = torch.Generator().manual_seed(3)
    levels = alq_core.default_levels(sim.config)
    for k in range(grads.shape[0]):
        noise = torch.rand(3000, generator=gen)
        q = alq_torch.quantize(grads[k], levels, sim.config, noise=noise)
        torch.testing.assert_close(deq[k], alq_torch.dequantize(q, levels), rtol=0, atol=0)


def test_reduce_averages_the_dequantized_workers() -> None:
    grads = _grads()
    a, b = _sim("qsgdinf", seed=1), _sim("qsgdinf", seed=1)
    out = a.reduce(grads, measure=True)
    deq = b.dequantized(grads)
    torch.testing.assert_close(out.mean, deq.mean(0), rtol=0, atol=0)
    expected = SimulatedWorkers.normalized_variance(deq, grads)
    assert out.variance == pytest.approx(expected, rel=1e-12)
    assert out.variance > 0


def test_average_is_unbiased_over_many_draws() -> None:
    grads = _grads(k=2, n=2048)
    sim = _sim("nuqsgd", seed=5)
    total = torch.zeros(2048, dtype=torch.float64)
    reps = 400
    for _ in range(reps):
        total += sim.reduce(grads).mean.double()
    err = (total / reps - grads.mean(0).double()).norm() / grads.mean(0).double().norm()
    # Normalized variance of one worker ~ O(1..10) here; averaging 2 workers x 400 draws -> error ~ 0.1.
    single = sim.variance(grads)
    bound = 4 * np.sqrt(single / (2 * reps))
    assert float(err) < bound, f"relative error {float(err):.4f} of the mean exceeds {bound:.4f}"


@pytest.mark.parametrize("method", ADAPTIVE)
def test_adaptive_levels_have_lower_variance_than_nuqsgd_on_the_same_gradients(method: str) -> None:
    grads = _grads(k=4, n=8192)
    nuq = _sim("nuqsgd", seed=11)
    ada = _sim(method, seed=11)
    report = ada.update_levels(grads, step=0)
    assert report is not None
    assert int(ada.quantizer.version) > 0, f"no level update happened: {getattr(report, 'reason', report)}"
    v_nuq, v_ada = nuq.variance(grads, repeats=3), ada.variance(grads, repeats=3)
    assert v_ada < v_nuq, f"{method}: variance {v_ada:.4g} not below NUQSGD's {v_nuq:.4g}"


@pytest.mark.parametrize(("k", "n", "d"), [(3, 1000, 256), (2, 1024, 256)])
def test_stats_are_each_workers_full_buckets_as_the_core_computes_them(k: int, n: int, d: int) -> None:
    # What reaches the model: every worker's full buckets (the partial tail bucket is skipped,
    # SPEC section 5), identical to alq_core.compute_stats on the rows.
    grads = _grads(k=k, n=n)
    got = _sim("alq", bucket=d).stats(grads)
    want = alq_core.compute_stats([row.numpy() for row in grads], d)
    assert got.num_buckets == want.num_buckets == k * (n // d)
    for name in ("norms", "means", "stds"):
        np.testing.assert_allclose(getattr(got, name), getattr(want, name), rtol=1e-12, atol=1e-15, err_msg=name)
    np.testing.assert_array_equal(got.sizes, want.sizes)


def test_alq_beats_amq_on_gradients_the_model_fits() -> None:
    # Gaussian coordinates in whole buckets: the truncated-normal model is right, so ALQ (optimal
    # over all tables) must not lose to AMQ (optimal over exponential tables) on the measured
    # variance. Heavy-tailed real gradients can reverse this (model misfit), not a bug.
    grads = torch.randn(8, 4096, generator=torch.Generator().manual_seed(5)) * 1e-3
    v = {}
    for method in ("alq", "amq"):
        sim = _sim(method, bucket=512, seed=3)
        report = sim.update_levels(grads, step=0)
        assert report is not None and report.updated, getattr(report, "reason", report)
        v[method] = sim.variance(grads, repeats=4)
    assert v["alq"] < 0.8 * v["amq"], v


def test_reduce_updates_levels_when_the_schedule_says_so() -> None:
    grads = _grads(n=2048)
    sim = _sim("alq", seed=2)
    before = sim.levels.clone()
    out = sim.reduce(grads, step=0)
    if sim.quantizer.due(0):
        assert out.updated and out.update_seconds > 0
        assert not torch.equal(before, sim.levels)
    fixed = _sim("qsgd")
    out = fixed.reduce(grads, step=0)
    assert not out.updated and out.update_seconds == 0.0


def test_state_dict_resumes_identically() -> None:
    grads = _grads(n=2048)
    a = _sim("alq", seed=4)
    a.update_levels(grads, step=0)
    a.reduce(grads)
    state = a.state_dict()
    b = _sim("alq", seed=99)
    b.load_state_dict(state)
    torch.testing.assert_close(a.reduce(grads).mean, b.reduce(grads).mean, rtol=0, atol=0)
    torch.testing.assert_close(a.levels, b.levels, rtol=0, atol=0)


def test_bits_per_worker_is_the_payload_size() -> None:
    sim = _sim("alq", bucket=1024)
    assert sim.bits_per_worker(5000) == 8 * alq_core.payload_size(sim.config, 5000)
    assert _sim("fp32").bits_per_worker(10) == 8 * (alq_core.HEADER_SIZE + 40)


def test_bad_input_is_rejected_with_a_clear_message() -> None:
    sim = _sim("qsgd")
    with pytest.raises(ValueError, match=r"`grads` must have shape \(K, n\)"):
        sim.reduce(torch.zeros(10))
    with pytest.raises(TypeError, match=r"`grads` must be a torch.Tensor"):
        sim.reduce(np.zeros((2, 10)))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"`config` must be an alq_core.QuantizerConfig"):
        SimulatedWorkers("alq")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"`dist_num` must be a positive integer"):
        SimulatedWorkers(alq_core.QuantizerConfig("alq"), dist_num=0)


def test_zero_gradient_rows_do_not_break_the_variance() -> None:
    grads = _grads(k=3, n=1024)
    grads[1] = 0
    v = _sim("nuqsgd").reduce(grads, measure=True).variance
    assert v is not None and np.isfinite(v) and v > 0


# ------------------------------------------------------------------ exact_mask and measured errors
def _mask(n: int, seed: int = 0, share: float = 0.2) -> torch.Tensor:
    return torch.rand(n, generator=torch.Generator().manual_seed(100 + seed)) < share


@pytest.mark.parametrize(
    ("method", "n", "bucket"), [("nuqsgd", 3000, 256), ("qsgdinf", 4096, 1024), ("trn", 3000, 256)]
)
def test_exact_mask_sends_masked_coordinates_exactly_and_quantizes_the_rest_as_one_gradient(
    method: str, n: int, bucket: int
) -> None:
    # Aligned, zero-padded and (trn: clipped, unaligned) per-worker-loop paths over the kept coordinates.
    grads = _grads(k=4, n=n)
    mask = _mask(n)
    keep = ~mask
    masked = SimulatedWorkers(alq_core.QuantizerConfig(method, bits=3, bucket_size=bucket), seed=9, exact_mask=mask)
    plain = _sim(method, bucket=bucket, seed=9)
    out = masked.reduce(grads, measure=True)
    assert torch.equal(out.mean[mask], grads.mean(0)[mask])  # the plain float32 mean, bit for bit
    deq_plain = plain.dequantized(grads[:, keep])  # the concatenated kept coordinates, same noise stream
    torch.testing.assert_close(out.mean[keep], deq_plain.mean(0), rtol=0, atol=0)
    # Same generator state afterwards: both drew exactly the noise of the kept coordinates.
    assert torch.equal(masked.generator.get_state(), plain.generator.get_state())
    assert out.metrics is not None and out.variance is not None and out.variance > 0


def test_exact_mask_codes_equal_quantizing_the_kept_coordinates_directly() -> None:
    grads = _grads(k=3, n=2000)
    mask = _mask(2000, seed=1, share=0.5)
    sim = SimulatedWorkers(alq_core.QuantizerConfig("qsgd", bits=3, bucket_size=128), seed=5, exact_mask=mask)
    deq = sim.dequantized(grads)
    part = grads[:, ~mask]
    m = part.shape[1]
    n_pad = -(-m // 128) * 128
    noise = torch.rand(3 * n_pad, generator=torch.Generator().manual_seed(5))
    levels = alq_core.default_levels(sim.config)
    for k in range(3):
        q = alq_torch.quantize(part[k], levels, sim.config, noise=noise[k * n_pad : k * n_pad + m])
        torch.testing.assert_close(deq[k, ~mask], alq_torch.dequantize(q, levels), rtol=0, atol=0)
        assert torch.equal(deq[k, mask], grads[k, mask])


def test_exact_mask_statistics_and_bits_are_over_the_quantized_part() -> None:
    grads = _grads(k=2, n=3000)
    mask = _mask(3000, seed=2)
    sim = SimulatedWorkers(alq_core.QuantizerConfig("alq", bits=3, bucket_size=256), exact_mask=mask)
    got = sim.stats(grads)
    want = alq_core.compute_stats([row.numpy() for row in grads[:, ~mask]], 256)
    np.testing.assert_allclose(got.norms, want.norms, rtol=1e-12)
    e = int(mask.sum())
    assert sim.num_exact == e
    assert sim.bits_per_worker(3000) == 8 * alq_core.payload_size(sim.config, 3000 - e) + 32 * e
    fp = SimulatedWorkers(alq_core.QuantizerConfig("fp32"), exact_mask=mask)
    assert fp.bits_per_worker(3000) == 8 * alq_core.payload_size(fp.config, 3000)
    every = SimulatedWorkers(alq_core.QuantizerConfig("qsgd"), exact_mask=torch.ones(100, dtype=torch.bool))
    assert torch.equal(every.reduce(grads[:, :100]).mean, grads[:, :100].mean(0))


def test_exact_mask_is_validated() -> None:
    cfg = alq_core.QuantizerConfig("qsgd", bits=3, bucket_size=64)
    with pytest.raises(TypeError, match=r"`exact_mask` must be a 1-D bool torch.Tensor .*; got torch.float32 tensor"):
        SimulatedWorkers(cfg, exact_mask=torch.zeros(10))
    with pytest.raises(TypeError, match=r"`exact_mask` must be a 1-D bool torch.Tensor .*; got list"):
        SimulatedWorkers(cfg, exact_mask=[True, False])  # type: ignore[arg-type]
    sim = SimulatedWorkers(cfg, exact_mask=torch.zeros(10, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"`exact_mask` covers 10 coordinates but the gradient has n=12"):
        sim.reduce(torch.zeros(2, 12))
    with pytest.raises(ValueError, match=r"covers 10 coordinates but the gradient has n=11"):
        sim.bits_per_worker(11)


def test_exact_mask_from_params_marks_1d_tensors() -> None:
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2, bias=False))
    mask = alq_torch.exact_mask_from_params(list(net.parameters()))
    want = [False] * 12 + [True] * 4 + [True] * 8 + [False] * 8
    assert mask.dtype == torch.bool and mask.tolist() == want
    assert alq_torch.exact_mask_from_params([]).shape == (0,)


def test_reduce_measures_the_error_metrics() -> None:
    grads = _grads(k=4, n=2048)
    layers = [("w1", 1000), ("b1", 24), ("w2", 1024)]
    a, b = _sim("qsgdinf", seed=3), _sim("qsgdinf", seed=3)
    out = a.reduce(grads, measure=True, layers=layers)
    want = alq_torch.error_metrics(b.dequantized(grads), grads, layers=layers)
    assert out.variance == want.variance and out.top_error == want.top_error
    assert out.top_share == want.top_share and out.avg_error == want.avg_error
    assert out.layer_errors == want.layers and list(out.layer_errors) == ["w1", "b1", "w2"]
    assert 0 < out.top_share < 1 and out.top_error > 0
    # Averaging K independent quantizations shrinks the error of the update below the per-worker one.
    assert 0 < out.avg_error < out.variance
    plain = _sim("qsgdinf").reduce(grads)
    assert plain.top_error is None and plain.metrics is None and plain.layer_errors is None
    assert _sim("qsgdinf").reduce(grads, measure=True).layer_errors is None
    fp = _sim("fp32").reduce(grads, measure=True, layers=layers)
    assert fp.variance == fp.top_error == fp.avg_error == 0.0
    assert fp.layer_errors == {"w1": 0.0, "b1": 0.0, "w2": 0.0}


def test_exact_mask_zeroes_the_error_of_the_masked_layers() -> None:
    grads = _grads(k=3, n=1024)
    layers = [("w", 1000), ("b", 24)]
    mask = torch.zeros(1024, dtype=torch.bool)
    mask[1000:] = True
    out = SimulatedWorkers(alq_core.QuantizerConfig("alq", bits=3, bucket_size=256), seed=0, exact_mask=mask).reduce(
        grads, measure=True, layers=layers
    )
    assert out.layer_errors is not None and out.layer_errors["b"] == 0.0 and out.layer_errors["w"] > 0
