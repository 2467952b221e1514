"""Payload-header checks of the DDP hook: device flags per round, read back without stalling.

On CUDA the hook's decode kernels compare every received payload header with this rank's (level-table
version and checksum, configuration, element count) on the device and set one int32 flag per DDP
bucket instead of synchronizing. At the end of a round the flags are copied to pinned host memory
behind an event (:class:`_PendingCheck`) and cleared; a later hook call (or :meth:`ALQState.check`)
looks at the copies and raises :class:`alq_core.PayloadError` for a failed round. On the CPU the
decode checks headers on the host and raises at once.

:class:`_HeaderChecks` is the part of :class:`alq_torch.ALQState` that keeps those flags.
"""

from __future__ import annotations

import threading
from typing import Any

import torch
from alq_core import PayloadError

from ._telemetry import current_stream

#: Header-check flags kept per round (one per DDP bucket index; higher indices share the last).
_MAX_FLAGS = 256


class _PendingCheck:
    """A round's device-side header-check flags, read back without stalling (pinned copy + event)."""

    __slots__ = ("_event", "_flags", "step")

    def __init__(self, flags: torch.Tensor, step: int) -> None:
        self._event: Any = None
        if flags.device.type == "cuda":
            self._flags = torch.empty(flags.shape, dtype=flags.dtype, pin_memory=True)
            self._flags.copy_(flags, non_blocking=True)
            self._event = torch.cuda.Event()  # type: ignore[no-untyped-call]
            self._event.record(current_stream(flags.device))
        else:  # host flags (tests): nothing to wait for
            self._flags = flags.clone()
        self.step = step

    def failed(self, block: bool) -> list[int] | None:
        """Bucket indices whose headers differed (empty if none); None if not yet known and ``block`` is False."""
        if self._event is not None:
            if not block and not self._event.query():
                return None
            self._event.synchronize()
        return [int(i) for i in torch.nonzero(self._flags).flatten().tolist()]


class _HeaderChecks:
    """The header-check flags of the hook's state: handed to the decodes, collected per round, raised on.

    The state's round counter (``step``, ``_in_round``) says which round a flag belongs to.
    """

    step: int
    _in_round: bool

    def _init_checks(self) -> None:
        self._pending: list[_PendingCheck] = []
        self._flags: torch.Tensor | None = None  # int32 (_MAX_FLAGS,) on the GPU: header mismatches this round
        self._flags_used = False
        self._lock = threading.Lock()

    def check(self) -> None:
        """Raise :class:`alq_core.PayloadError` if a GPU header check of this or an earlier round failed.

        On CUDA the decode kernels compare payload headers on the device (no
        stall) and set a flag per bucket; the hook reads a round's flags back
        asynchronously and raises at a later hook call (within two rounds).
        Calling this after ``optimizer.step()`` checks now (synchronizes).
        """
        self._collect_flags(self.step if self._in_round else self.step - 1)
        self._raise_failed_checks(block=True)

    def _collect_flags(self, step: int) -> None:
        """Queue the read-back of the flags of round ``step`` and clear them (stream-ordered after its decodes)."""
        if self._flags is not None and self._flags_used:
            with self._lock:
                self._pending.append(_PendingCheck(self._flags, step))
                self._flags.zero_()
                self._flags_used = False

    def _flag(self, device: torch.device, index: int) -> torch.Tensor | bool:
        """The header-check flag of bucket ``index`` on ``device`` (CUDA), or True (check on the host)."""
        if device.type != "cuda":
            return True
        if self._flags is None or self._flags.device != device:
            self._flags = torch.zeros(_MAX_FLAGS, dtype=torch.int32, device=device)
        self._flags_used = True
        i = min(index, _MAX_FLAGS - 1)
        return self._flags[i : i + 1]

    def _raise_failed_checks(self, block: bool) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        keep: list[_PendingCheck] = []
        for i, p in enumerate(pending):
            failed = p.failed(block)
            if failed is None:  # rounds complete in order: the later ones are not known either
                keep = pending[i:]
                break
            if failed:
                last = "" if failed[-1] < _MAX_FLAGS - 1 else f" (index {_MAX_FLAGS - 1} stands for all higher ones)"
                msg = (
                    f"step {p.step}, bucket(s) {failed}{last}: a payload header did not match this rank's"
                    " (level-table version, table checksum, configuration or element count): the ranks' level"
                    " tables diverged. The averaged gradient of those buckets was replaced by NaN."
                )
                raise PayloadError(msg)
        with self._lock:
            self._pending = keep + self._pending
