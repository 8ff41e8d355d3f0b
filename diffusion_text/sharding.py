"""Device mesh, sharding rules and the parallelism modes (DESIGN.md section 4).

One mesh with axes ('data', 'fsdp'): the batch is split over both axes;
parameters (and optimizer state) are replicated, or, when the 'fsdp' axis
has more than one device, sharded along their largest divisible dimension.
On CPU the mesh must use `AxisType.Auto` axes (explicit axes break embedding
lookups on sharded batches in JAX 0.10).

The parallelism modes (`PARALLEL`: `sharded`, `pmap`) wrap one step
function for a given mesh; training and evaluation use the same mesh, built
from `train.mesh_data` x `train.mesh_fsdp` by `mesh_from_config`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from diffusion_text.config import TrainConfig

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


def mesh_from_config(train_cfg: TrainConfig) -> Mesh:
  """The run's mesh from `train.mesh_data` x `train.mesh_fsdp`."""
  return make_mesh(train_cfg.mesh_data, train_cfg.mesh_fsdp)


def batch_devices(mesh: Mesh) -> int:
  """Devices the batch is split over (every device of the mesh)."""
  return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def pad_batch(batch: dict, multiple: int) -> tuple[dict, int]:
  """Append masked-out rows until the batch divides `multiple`.

  A padded row has mask 0 everywhere, so it adds nothing to any per-row sum;
  callers drop the padded rows' outputs. Returns (batch, real rows).
  """
  rows = len(batch["mask"])
  pad = -rows % multiple
  if not pad:
    return batch, rows
  return {k: np.concatenate([np.asarray(v), np.zeros((pad,) + np.shape(v)[1:],
                                                     np.asarray(v).dtype)])
          for k, v in batch.items()}, rows


# --------------------------------------------------------- parallelism modes
class Sharded:
  """jax.jit with NamedShardings over `mesh`: XLA inserts the collectives.

  `step_fn_factory(axis_name)` returns the step; here axis_name is None.
  """

  def __init__(self, mesh: Mesh, step_fn_factory, state):
    self.mesh = mesh
    self.state_sharding = state_shardings(state, mesh)
    self.step = jax.jit(
        step_fn_factory(None),
        in_shardings=(self.state_sharding, batch_sharding(mesh), replicated(mesh)),
        out_shardings=(self.state_sharding, replicated(mesh)),
        donate_argnums=(0,))

  def place_state(self, state):
    return jax.device_put(state, self.state_sharding)

  def place_batch(self, batch):
    return global_batch(batch, self.mesh)

  def host_state(self, state):
    return state

  def target(self, state):
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        state, self.state_sharding)


class Pmap:
  """jax.pmap data parallelism over the local devices of `mesh` (kept for
  users who rely on it; the state carries a leading device axis)."""

  def __init__(self, mesh: Mesh, step_fn_factory, state):
    del state
    if jax.process_count() > 1:
      # Multi-process pmap stalls (2 CPU processes, JAX 0.10); the sharded
      # mode is the multi-process path.
      raise ValueError("train.parallel=pmap runs in one process only; use "
                       "train.parallel=sharded for multi-process training")
    self.mesh = mesh
    self.devices = list(mesh.devices.flat)
    self.n = len(self.devices)
    self.step = jax.pmap(step_fn_factory("batch"), axis_name="batch",
                         in_axes=(0, 0, None), donate_argnums=(0,),
                         devices=self.devices)

  def place_state(self, state):
    return jax.tree.map(lambda x: jnp.broadcast_to(x, (self.n,) + x.shape),
                        state)

  def place_batch(self, batch):
    rows = len(batch["mask"])
    if rows % self.n:
      raise ValueError(f"data.batch_size={rows} must be divisible by the "
                       f"{self.n} devices for train.parallel=pmap")
    return {k: np.asarray(v).reshape((self.n, -1) + v.shape[1:])
            for k, v in batch.items()}

  def host_state(self, state):
    return jax.tree.map(lambda x: x[0], state)

  def target(self, state):
    return state


PARALLEL = {"sharded": Sharded, "pmap": Pmap}
