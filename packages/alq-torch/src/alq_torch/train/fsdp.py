"""The harness under ``torchrun --fsdp``: FSDP2 sharding, ALQ's FSDP comms, checkpoints of local shards.

:func:`shard_model` applies ``fully_shard`` to every parameter-owning unit of the model and then to the
root, and installs :func:`alq_torch.register_fsdp`'s comm:

* ``fsdp`` layout (``--fsdp``): one shard group of all ``W`` ranks; FSDP's reduce-scatter is quantized
  (:class:`alq_torch.ALQReduceScatter`).
* ``hsdp`` layout (``--fsdp --shard-size N``, ``N < W``): a 2-D mesh ``(W // N, N)`` named
  ``("replicate", "shard")``; the model is sharded over the ``N`` ranks of a group with FSDP's own exact
  reduce-scatter, and the average across the ``W // N`` groups is quantized
  (:class:`alq_torch.ALQAllReduceHook`).

Checkpoints stay loadable with ``torch.load(weights_only=True)``: :func:`local_snapshot` replaces every
DTensor of the model and optimizer state by this rank's local shard (a plain tensor), and
:func:`from_local` rebuilds the DTensors on resume (``DTensor.from_local`` with the global shape and
stride, so uneven shards come back as they were) after checking that the checkpoint was written by the
same layout and that every local shard has this rank's shape.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from .settings import Layout

#: Modules that only hold other modules: :func:`shard_units` looks inside them for the units to shard.
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The modules :func:`shard_model` shards one by one before the root.

    Every child of ``model`` that owns parameters, looking through containers (``nn.Sequential``,
    ``nn.ModuleList``, ``nn.ModuleDict``): an MLP's ``Linear`` layers, a ResNet's stem, residual blocks
    and classifier. Each unit is one all-gather in forward and one reduce-scatter in backward.
    """
    units: list[nn.Module] = []
    for child in model.children():
        if isinstance(child, _CONTAINERS):
            units.extend(shard_units(child))
        elif any(True for _ in child.parameters()):
            units.append(child)
    return units


def shard_model(
    model: nn.Module, layout: Layout, device: torch.device, config: Any, **comm_kwargs: Any
) -> tuple[Any, Any]:
    """Shard ``model`` in place with FSDP2 for ``layout`` and install ALQ; returns ``(comm, mesh)``.

    Parameters
    ----------
    model : nn.Module
        On ``device``, identical on every rank (same seed).
    layout : Layout
        ``fsdp`` or ``hsdp`` (see the module notes).
    device : torch.device
        The mesh's device type (``cpu`` with Gloo, ``cuda`` with NCCL).
    config : alq_core.QuantizerConfig
    **comm_kwargs
        Passed to :func:`alq_torch.register_fsdp` (``quantizer``, ``seed``, ``exact_below``, ...).

    Returns
    -------
    comm : ALQReduceScatter or ALQAllReduceHook
        Holds the level table, telemetry (``last_record``) and ``state_dict``.
    mesh : DeviceMesh
        1-D over the world (``fsdp``) or 2-D ``(replicate, shard)`` (``hsdp``).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from .. import register_fsdp

    if layout.kind == "hsdp":
        mesh = init_device_mesh(device.type, (layout.replicas, layout.shard), mesh_dim_names=("replicate", "shard"))
        shard_mesh = mesh["shard"]
    elif layout.kind == "fsdp":
        mesh = shard_mesh = init_device_mesh(device.type, (layout.world,), mesh_dim_names=("shard",))
    else:
        msg = f"shard_model needs an 'fsdp' or 'hsdp' layout; got {layout.kind!r}"
        raise ValueError(msg)
    for unit in shard_units(model):
        fully_shard(unit, mesh=shard_mesh)
    fully_shard(model, mesh=shard_mesh)
    hybrid = layout.kind == "hsdp"
    comm = register_fsdp(model, config, hybrid=hybrid, mesh=mesh if hybrid else None, **comm_kwargs)
    return comm, mesh


def _local(obj: Any) -> Any:
    """``obj`` with every DTensor replaced by a CPU copy of its local shard (containers rebuilt as dict/list)."""
    if isinstance(obj, DTensor):
        return obj.to_local().detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _local(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        items = [_local(v) for v in obj]
        return items if isinstance(obj, list) else tuple(items)
    return obj


def local_snapshot(ck: dict[str, Any], mode: str) -> dict[str, Any]:
    """A checkpoint (``loop._snapshot``) with the model and optimizer holding local shards; ``mode`` records the layout."""
    return {**ck, "model": _local(ck["model"]), "optimizer": _local(ck["optimizer"]), "layout": mode}


def _as_dtensor(saved: Tensor, like: DTensor, what: str, path: str, device: torch.device) -> DTensor:
    """``saved`` (a local shard) as a DTensor placed like ``like``, after checking its shape."""
    want = tuple(like.to_local().shape)
    if tuple(saved.shape) != want:
        msg = (
            f"checkpoint {path!r}: {what} is a local shard of shape {tuple(saved.shape)}; this rank's shard has "
            f"shape {want} (global {tuple(like.shape)}); the checkpoint was written by another rank or layout; "
            "fix: resume with the same torchrun layout (nodes, processes per node, --shard-size)"
        )
        raise ValueError(msg)
    return DTensor.from_local(
        saved.to(device), like.device_mesh, like.placements, run_check=False, shape=like.shape, stride=like.stride()
    )


def from_local(
    ck: dict[str, Any], *, model: nn.Module, opt: torch.optim.Optimizer, mode: str, path: str, device: torch.device
) -> dict[str, Any]:
    """The inverse of :func:`local_snapshot`: DTensors rebuilt from the local shards of ``ck``, for ``load_state_dict``.

    Raises ValueError (expected / got / fix) when the checkpoint comes from another layout, or a shard's
    shape is not this rank's.
    """
    if ck.get("layout") != mode:
        msg = (
            f"checkpoint {path!r} was written by layout {ck.get('layout')!r}; this job is {mode!r}; fix: resume "
            "with the same torchrun layout (nodes, processes per node, --shard-size)"
        )
        raise ValueError(msg)
    current = model.state_dict()
    model_sd: dict[str, Any] = {}
    for name, value in ck["model"].items():
        like = current.get(name)
        model_sd[name] = _as_dtensor(value, like, name, path, device) if isinstance(like, DTensor) else value
    params = [p for group in opt.param_groups for p in group["params"]]
    opt_state: dict[Any, Any] = {}
    for idx, entry in ck["optimizer"]["state"].items():
        p = params[int(idx)]
        opt_state[idx] = {
            # per-element state (momentum, Adam's moments) has the parameter's local shape; scalars stay plain
            k: _as_dtensor(v, p, f"optimizer state {k!r} of parameter {idx}", path, device)
            if isinstance(p, DTensor) and isinstance(v, Tensor) and v.dim() > 0
            else v
            for k, v in entry.items()
        }
    return {**ck, "model": model_sd, "optimizer": {**ck["optimizer"], "state": opt_state}}


__all__ = ["from_local", "local_snapshot", "shard_model", "shard_units"]
