"""Helpers for calling the DDP hook outside DDP (tests, benchmarks, your own checks)."""

from __future__ import annotations

import torch


class FakeBucket:
    """What :func:`alq_torch.alq_hook` uses of ``torch.distributed.GradBucket``.

    Parameters
    ----------
    buf : Tensor
        The flat gradient buffer (float32, float16 or bfloat16, shape ``(n,)``); the hook averages into it.
    index : int
        The bucket's index in its round.
    last : bool
        Whether it is the round's last bucket (the hook ends the round after it).

    Examples
    --------
    >>> fut = alq_hook(state, FakeBucket(grad, 0, True))  # doctest: +SKIP
    """

    def __init__(self, buf: torch.Tensor, index: int = 0, last: bool = True) -> None:
        self._buf, self._index, self._last = buf, index, last

    def buffer(self) -> torch.Tensor:
        return self._buf

    def index(self) -> int:
        return self._index

    def is_last(self) -> bool:
        return self._last

    def parameters(self) -> list[torch.Tensor]:
        return []
