"""Batched worker gradients (one vmapped pass) equal K sequential passes, BatchNorm included."""

from __future__ import annotations

import copy

import pytest
import torch
from alq_torch.train import build_model
from alq_torch.train.workers import GradientComputer, compose_running_stats, supports_batched
from torch import nn


def _tiny_resnet() -> nn.Module:
    torch.manual_seed(0)
    return build_model("resnet8", (3, 8, 8), 10)


def _data(k: int, b: int = 6, shape: tuple[int, ...] = (3, 8, 8)) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(k)
    return torch.randn(k, b, *shape, generator=g), torch.randint(0, 10, (k, b), generator=g)


def _compare(net: nn.Module, k: int, batchnorm: str = "vmap", **kw: object) -> None:
    ref = copy.deepcopy(net)
    xs, ys = _data(k)
    g_seq, l_seq = GradientComputer(ref, "sequential", **kw)(xs, ys)  # type: ignore[arg-type]
    gc = GradientComputer(net, "batched", batchnorm=batchnorm, **kw)  # type: ignore[arg-type]
    assert gc.batched
    g_bat, l_bat = gc(xs, ys)
    assert g_bat.shape == g_seq.shape == (k, sum(p.numel() for p in net.parameters()))
    assert g_bat.dtype == torch.float32
    torch.testing.assert_close(g_bat, g_seq, rtol=1e-4, atol=1e-5)
    assert l_bat == pytest.approx(l_seq, rel=1e-5)
    bufs, ref_bufs = dict(net.named_buffers()), dict(ref.named_buffers())
    assert bufs.keys() == ref_bufs.keys()
    for name, b in bufs.items():
        if b.dtype == torch.long:
            assert torch.equal(b, ref_bufs[name]), name
        else:
            torch.testing.assert_close(b, ref_bufs[name], rtol=1e-5, atol=1e-6, msg=name)


BN_MODES = pytest.mark.parametrize("batchnorm", ["vmap", "functional"])


@BN_MODES
@pytest.mark.parametrize("k", [1, 3])
def test_batched_resnet_equals_sequential_in_train_mode(k: int, batchnorm: str) -> None:
    net = _tiny_resnet()
    with torch.no_grad():  # non-trivial running statistics to start from
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    _compare(net, k, batchnorm)
    bn = next(m for m in net.modules() if isinstance(m, nn.BatchNorm2d))
    assert int(bn.num_batches_tracked) == k


@BN_MODES
def test_batched_resnet_two_steps_and_eval_mode(batchnorm: str) -> None:
    net = _tiny_resnet()
    ref = copy.deepcopy(net)
    assert not GradientComputer(net).batched  # auto: BatchNorm models batch on CUDA only
    seq, bat = GradientComputer(ref, "sequential"), GradientComputer(net, "batched", batchnorm=batchnorm)  # type: ignore[arg-type]
    for step in range(2):
        xs, ys = _data(3 + step)
        torch.testing.assert_close(bat(xs, ys)[0], seq(xs, ys)[0], rtol=1e-4, atol=1e-5)
    for a, b in zip(net.buffers(), ref.buffers()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # eval mode: running statistics are used and left alone, on both paths
    net.eval()
    ref.eval()
    before = [b.clone() for b in net.buffers()]
    xs, ys = _data(2)
    torch.testing.assert_close(bat(xs, ys)[0], seq(xs, ys)[0], rtol=1e-4, atol=1e-5)
    for a, b in zip(net.buffers(), before):
        assert torch.equal(a, b)


@BN_MODES
def test_momentum_none_and_untracked_batchnorm(batchnorm: str) -> None:
    torch.manual_seed(1)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4, momentum=None),
        nn.ReLU(),
        nn.Conv2d(4, 5, 3),
        nn.BatchNorm2d(5, track_running_stats=False),
        nn.Flatten(),
        nn.Linear(5 * 4 * 4, 10),
    )
    net[1].num_batches_tracked.fill_(2)
    _compare(net, 3, batchnorm)


@pytest.mark.parametrize("k", [1, 3])
def test_model_without_buffers(k: int) -> None:
    torch.manual_seed(0)
    net = build_model("mlp-8", (3, 8, 8), 10)
    assert supports_batched(net) and GradientComputer(net).batched
    _compare(net, k)


@BN_MODES
def test_bf16_autocast_and_channels_last(batchnorm: str) -> None:
    net = _tiny_resnet().to(memory_format=torch.channels_last)
    ref = copy.deepcopy(net)
    xs, ys = _data(3)
    g_seq, _ = GradientComputer(ref, "sequential", amp="bf16", channels_last=True)(xs, ys)
    g_bat, _ = GradientComputer(net, "batched", amp="bf16", channels_last=True, batchnorm=batchnorm)(xs, ys)  # type: ignore[arg-type]
    g_fp32, _ = GradientComputer(copy.deepcopy(ref), "sequential")(xs, ys)
    assert g_bat.dtype == torch.float32
    # bf16 rounding differs between the paths (about 10% of the norm at this tiny size); both stay near fp32
    scale = g_fp32.norm(dim=1)
    assert bool(((g_bat - g_seq).norm(dim=1) < 0.25 * scale).all())
    assert bool(((g_bat - g_fp32).norm(dim=1) < 0.25 * scale).all())
    for a, b in zip(net.buffers(), ref.buffers()):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)
    # channels_last alone (fp32) is exact
    net2 = _tiny_resnet().to(memory_format=torch.channels_last)
    _compare(net2, 3, batchnorm, channels_last=True)


def test_compose_running_stats_equals_sequential_updates() -> None:
    torch.manual_seed(0)
    bn, ref = nn.BatchNorm1d(4, momentum=0.3), nn.BatchNorm1d(4, momentum=0.3)
    means, variances = torch.randn(5, 4), torch.rand(5, 4) + 0.5
    for k in range(5):
        ref.running_mean.mul_(0.7).add_(0.3 * means[k])
        ref.running_var.mul_(0.7).add_(0.3 * variances[k])
    compose_running_stats([bn], means, variances, 5)
    torch.testing.assert_close(bn.running_mean, ref.running_mean)
    torch.testing.assert_close(bn.running_var, ref.running_var)
    assert int(bn.num_batches_tracked) == 5


class _Counter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 10)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        out: torch.Tensor = self.lin(x)
        return out


def test_other_buffers_fall_back_or_refuse() -> None:
    net = _Counter()
    assert not supports_batched(net)
    assert not GradientComputer(net).batched
    with pytest.raises(ValueError, match=r"only buffers are BatchNorm statistics; got other buffers \['calls'\]"):
        GradientComputer(net, "batched")
    with pytest.raises(ValueError, match=r"`batched` must be one of"):
        GradientComputer(net, "fast")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"`batchnorm` must be one of"):
        GradientComputer(net, batchnorm="fused")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"`amp` must be one of"):
        GradientComputer(net, amp="fp16")
    with pytest.raises(ValueError, match=r"expected xs \(K, B, \.\.\.\) and ys \(K, B\)"):
        GradientComputer(net)(torch.zeros(2, 3, 4), torch.zeros(2, 4, dtype=torch.long))


def test_channels_last_falls_back_when_vmap_refuses_it(monkeypatch: pytest.MonkeyPatch) -> None:
    # torch 2.11 on CUDA raised "NYI: Tensor.clone(memory_format) inside vmap ... (got ChannelsLast)"
    # in the backward pass; training must continue in the contiguous layout.
    net = _tiny_resnet().to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    gc = GradientComputer(net, "batched", channels_last=True)
    real = GradientComputer._batched
    calls = []

    def flaky(self: GradientComputer, xs: torch.Tensor, ys: torch.Tensor) -> tuple[torch.Tensor, float]:
        calls.append(xs.is_contiguous())
        if len(calls) == 1:
            raise RuntimeError("NYI: Tensor.clone(memory_format) inside vmap is only supported with ...")
        return real(self, xs, ys)

    monkeypatch.setattr(GradientComputer, "_batched", flaky)
    xs, ys = _data(2)
    with pytest.warns(RuntimeWarning, match="continue in the contiguous layout"):
        grads, loss = gc(xs, ys)
    assert grads.shape[0] == 2 and loss > 0 and not gc.channels_last and calls[-1]
    assert all(p.is_contiguous() for p in net.parameters())
    monkeypatch.setattr(GradientComputer, "_batched", lambda *a: (_ for _ in ()).throw(RuntimeError("other")))
    with pytest.raises(RuntimeError, match="other"):
        gc(xs, ys)
