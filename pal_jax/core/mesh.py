"""Device mesh, logical axis rules and named shardings.

The mesh has three axes: `data` (pure data parallel), `fsdp` (data parallel with parameters sharded over it) and
`tensor` (model parallel). Parameters carry logical axis names; `config.mesh.axis_rules` maps them to mesh axes.
"""
from __future__ import annotations

import logging
import math
import os
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp", "tensor")
BATCH = ("data", "fsdp")  # mesh axes a batch's leading dim is split over


def cpu_devices(n: int, env=None) -> int:
    """Split the host CPU into n JAX devices (config mesh.cpu_devices) before any backend starts; returns the count
    set, or 0 where nothing was set (n = 0, or XLA_FLAGS already names a count: the explicit flag wins)."""
    env = os.environ if env is None else env
    if n <= 0 or "xla_force_host_platform_device_count" in env.get("XLA_FLAGS", ""):
        return 0
    jax.config.update("jax_num_cpu_devices", n)  # the CPU backend only: a GPU/TPU run keeps its accelerators
    return n


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
    """config.mesh.axis_rules (or a saved config's, as JSON lists) as the tuple of (logical axis, mesh axes)."""
    mesh_section = config["mesh"] if isinstance(config, dict) else config.mesh
    return tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in mesh_section["axis_rules"])


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


def process_rows(mesh: Mesh, n_rows: int) -> np.ndarray:
    """The rows of an [n_rows, ...] global batch that this process feeds: the union, in increasing order, of the
    row blocks its devices hold under batch_sharding (all rows with one process). A host builds only these rows;
    global_batch assembles the global array from them."""
    if jax.process_count() == 1:
        return np.arange(n_rows)
    blocks = {(s[0].start or 0, n_rows if s[0].stop is None else s[0].stop)
              for s in batch_sharding(mesh, 1).addressable_devices_indices_map((n_rows,)).values()}
    return np.concatenate([np.arange(a, b) for a, b in sorted(blocks)]).astype(np.int64)


def global_batch(batch: dict[str, np.ndarray], mesh: Mesh, n_rows: int | None = None) -> dict[str, jax.Array]:
    """Host-local numpy batch -> global jax arrays split along the batch axes.

    Each process passes its own rows, `process_rows(mesh, n_rows)` of the global batch (with one process: all of
    them); n_rows is the global batch's row count (None: inferred from the local rows and the sharding)."""
    def put(v):
        shape = None if n_rows is None else (n_rows, *v.shape[1:])
        return jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim), v, shape)
    return {k: put(v) for k, v in batch.items()}


def put_global(tree, shardings):
    """Host numpy arrays (the same full values on every process) -> global arrays with these shardings. With more
    than one process each process places only the slices its devices hold (jax.device_put would first all-gather
    every array to check that the processes agree: a full copy of the model per host)."""
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)
    return jax.tree.map(lambda x, s: jax.make_array_from_callback(np.shape(x), s, lambda idx: np.asarray(x)[idx]),
                        tree, shardings)


def to_host(x) -> np.ndarray:
    """A jax.Array's full value as numpy on every process (an all-gather when other processes hold parts of it)."""
    if getattr(x, "is_fully_addressable", True) or x.is_fully_replicated:
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def is_primary() -> bool:
    """Process 0: the one that writes logs, metrics, reports and other files beside the checkpoints."""
    return jax.process_index() == 0


def sync(name: str) -> None:
    """Wait until every process reaches this point (no-op with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def broadcast(value):
    """Process 0's value (a numpy-convertible pytree) on every process (no-op with one process)."""
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils
    return multihost_utils.broadcast_one_to_all(value)


def batch_divisor(mesh: Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]
