"""Per-bucket gradient statistics on the device, as small arrays for :mod:`alq_core`.

The level update runs in the core on host arrays; the device only reduces each
full bucket ``B`` of the flat gradient to four numbers: ``||B||_2`` and the mean
and population standard deviation of the normalized coordinates ``w = B/||B||``
(SPEC section 5), computed in float64.
"""

from __future__ import annotations

import torch

from ._quantize import check_tensor


def bucket_stats(x: torch.Tensor, bucket_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Statistics of every full bucket of ``x`` (the shorter last bucket is left out).

    Parameters
    ----------
    x : Tensor of float16, bfloat16, float32 or float64, any shape
        Flattened in C order.
    bucket_size : int
        Coordinates per bucket ``d``.

    Returns
    -------
    norms : Tensor of float64, shape (k,)
        ``sqrt(sum(B**2))`` per full bucket, ``k = x.numel() // bucket_size``.
    means : Tensor of float64, shape (k,)
        Mean of ``w = B / ||B||`` (0 for a zero bucket).
    stds : Tensor of float64, shape (k,)
        Population standard deviation of ``w`` (0 for a zero bucket).
    sizes : Tensor of int64, shape (k,)
        ``bucket_size`` for every bucket.

    All on ``x``'s device; feed them (as NumPy) to ``alq_core.GradientStats.from_buckets``.
    Non-finite buckets give non-finite statistics (the core skips them).
    """
    check_tensor(x)
    if isinstance(bucket_size, bool) or not isinstance(bucket_size, int) or bucket_size < 1:
        msg = f"`bucket_size` must be a positive integer; got {bucket_size!r}"
        raise ValueError(msg)
    flat = x.detach().reshape(-1)
    k = flat.numel() // bucket_size
    rows = flat[: k * bucket_size].view(k, bucket_size).to(torch.float64)
    norms = (rows * rows).sum(dim=1).sqrt()
    zero = norms == 0
    w = rows / torch.where(zero, torch.ones_like(norms), norms).unsqueeze(1)
    means = w.mean(dim=1)
    stds = (w - means.unsqueeze(1)).square().mean(dim=1).sqrt()
    sizes = torch.full((k,), bucket_size, dtype=torch.int64, device=flat.device)
    return norms, means, stds, sizes
