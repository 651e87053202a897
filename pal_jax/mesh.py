"""Device mesh, logical axis rules and named shardings.

The mesh has three axes: `data` (pure data parallel), `fsdp` (data parallel with parameters sharded over it) and
`tensor` (model parallel). Parameters carry logical axis names; `config.mesh.axis_rules` maps them to mesh axes.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp", "tensor")
BATCH = ("data", "fsdp")  # mesh axes a batch's leading dim is split over


def mesh_shape(sizes: dict[str, int], n_devices: int) -> tuple[int, ...]:
    """Resolve one -1 entry to the devices left over; check the product equals the device count."""
    shape = [int(sizes[a]) for a in AXES]
    free = [i for i, s in enumerate(shape) if s == -1]
    if len(free) > 1:
        raise ValueError(f"config.mesh: at most one axis may be -1, got {dict(zip(AXES, shape))}")
    fixed = math.prod(s for s in shape if s != -1)
    if free:
        if n_devices % fixed:
            raise ValueError(f"config.mesh: {dict(zip(AXES, shape))} does not divide {n_devices} devices")
        shape[free[0]] = n_devices // fixed
    if math.prod(shape) != n_devices:
        raise ValueError(f"config.mesh: {dict(zip(AXES, shape))} uses {math.prod(shape)} devices, "
                         f"but {n_devices} are present; expected a product of {n_devices} (use -1 for the rest)")
    return tuple(shape)


def make_mesh(mesh_config, devices: Sequence[jax.Device] | None = None) -> Mesh:
    devices = list(devices if devices is not None else jax.devices())
    shape = mesh_shape({a: mesh_config[a] for a in AXES}, len(devices))
    return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)


def axis_rules(config) -> tuple[tuple[str, Any], ...]:
    return tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in config.mesh.axis_rules)


def _fit_spec(spec: P, shape: tuple[int, ...], mesh: Mesh, name: str) -> P:
    """Drop mesh axes from dims they do not divide (those dims are replicated instead), with a log line."""
    out = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        if axes is None:
            out.append(None)
            continue
        names = axes if isinstance(axes, tuple) else (axes,)
        size = math.prod(mesh.shape[a] for a in names)
        if dim % size:
            logging.info("sharding: %s dim %d not divisible by mesh axes %s (%d); replicated", name, dim, names, size)
            out.append(None)
        else:
            out.append(axes)
    return P(*out)


def param_shardings(abstract_state: nnx.State, mesh: Mesh, rules) -> dict:
    """Pure-dict tree of NamedShardings for an nnx.State of Params annotated with logical axis names."""
    with nnx.logical_axis_rules(rules):
        specs = nnx.to_pure_dict(nnx.get_partition_spec(abstract_state))
    shapes = nnx.to_pure_dict(abstract_state)
    paths = jax.tree_util.tree_flatten_with_path(shapes)[0]
    flat_specs = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))
    shard = [NamedSharding(mesh, _fit_spec(s, x.shape, mesh, jax.tree_util.keystr(p)))
             for (p, x), s in zip(paths, flat_specs)]
    return jax.tree.unflatten(jax.tree.structure(shapes), shard)


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def global_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Host-local numpy batch -> global jax arrays split along the batch axes.

    Each process passes its own rows (its slice of the global batch); with one process that is the whole batch.
    """
    return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim), v) for k, v in batch.items()}


def batch_divisor(mesh: Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]
