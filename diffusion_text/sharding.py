"""Device mesh and sharding rules (DESIGN.md section 4).

One mesh with axes ('data', 'fsdp'): the batch is split over both axes;
parameters (and optimizer state) are replicated, or, when the 'fsdp' axis
has more than one device, sharded along their largest divisible dimension.
On CPU the mesh must use `AxisType.Auto` axes (explicit axes break embedding
lookups on sharded batches in JAX 0.10).
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

BATCH_AXES = ("data", "fsdp")


def make_mesh(data: int = -1, fsdp: int = 1, devices=None) -> Mesh:
  """A ('data', 'fsdp') mesh; data=-1 uses every device not on 'fsdp'."""
  devices = list(devices if devices is not None else jax.devices())
  n = len(devices)
  if data == -1:
    if n % fsdp:
      raise ValueError(f"train.mesh_fsdp={fsdp} does not divide the "
                       f"{n} available devices")
    data = n // fsdp
  if data * fsdp != n:
    raise ValueError(f"mesh {data}x{fsdp} (train.mesh_data x train.mesh_fsdp) "
                     f"does not match the {n} available devices")
  return jax.make_mesh((data, fsdp), ("data", "fsdp"),
                       axis_types=(AxisType.Auto, AxisType.Auto),
                       devices=devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over every device of the mesh."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def _param_spec(shape: tuple[int, ...], fsdp: int) -> P:
  if fsdp == 1 or not shape:
    return P()
  # Shard the largest dimension that the fsdp axis divides; small or
  # indivisible arrays stay replicated.
  order = np.argsort(shape)[::-1]
  for dim in order:
    if shape[dim] % fsdp == 0 and shape[dim] >= fsdp:
      spec = [None] * len(shape)
      spec[dim] = "fsdp"
      return P(*spec)
  return P()


def state_shardings(state, mesh: Mesh):
  """NamedShardings for a pytree of arrays (params, optimizer state, EMA)."""
  fsdp = mesh.shape["fsdp"]
  return jax.tree.map(
      lambda x: NamedSharding(mesh, _param_spec(tuple(np.shape(x)), fsdp)),
      state)


def global_batch(local_batch: dict, mesh: Mesh) -> dict:
  """Host-local numpy batch -> global jax.Array sharded over the batch axes.

  On one host this is a device_put; on many, each host contributes its own
  rows (`jax.make_array_from_process_local_data`).
  """
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}
