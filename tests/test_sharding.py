"""Mesh construction, sharding rules and the parallelism modes (1 device;
8-device equivalence is test_equivalence.py's)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from diffusion_text import config as config_lib, sharding


def test_mesh_errors_name_the_settings():
  with pytest.raises(ValueError, match="train.mesh_fsdp=4 does not divide the 6"):
    sharding.make_mesh(-1, 4, devices=[None] * 6)
  with pytest.raises(ValueError, match=r"mesh 2x2 .* 6 available devices"):
    sharding.make_mesh(2, 2, devices=[None] * 6)
  with pytest.raises(ValueError, match="train.mesh_fsdp=2"):
    sharding.mesh_from_config(config_lib.TrainConfig(mesh_fsdp=2))


def test_default_mesh_puts_every_device_on_data():
  mesh = sharding.mesh_from_config(config_lib.TrainConfig())
  assert dict(mesh.shape) == {"data": jax.device_count(), "fsdp": 1}
  assert sharding.batch_devices(mesh) == jax.device_count()


@pytest.mark.parametrize("shape, fsdp, spec", [
    ((8, 6), 4, P("fsdp", None)),     # the largest divisible dimension
    ((6, 8), 4, P(None, "fsdp")),
    ((6, 10), 4, P()),                # nothing divides: replicated
    ((12, 8), 3, P("fsdp", None)),
    ((2,), 4, P()),                   # smaller than the axis
    ((), 4, P()),
    ((8, 6), 1, P()),                 # no fsdp axis: replicated
])
def test_param_specs_under_fsdp(shape, fsdp, spec):
  assert sharding._param_spec(shape, fsdp) == spec


def test_global_batch_and_padding():
  mesh = sharding.make_mesh(1, 1, devices=jax.devices()[:1])
  batch = {"tokens": np.arange(15, dtype=np.int32).reshape(5, 3),
           "mask": np.ones((5, 3), np.int32)}
  g = sharding.global_batch(batch, mesh)
  assert g["tokens"].sharding == sharding.batch_sharding(mesh)
  np.testing.assert_array_equal(g["tokens"], batch["tokens"])

  padded, rows = sharding.pad_batch(batch, 4)
  assert rows == 5 and padded["tokens"].shape == (8, 3)
  np.testing.assert_array_equal(padded["tokens"][:5], batch["tokens"])
  assert padded["mask"][5:].sum() == 0 and padded["mask"].dtype == np.int32
  same, rows = sharding.pad_batch(batch, 5)
  assert same is batch and rows == 5


def _factory(axis_name):
  """A least-squares SGD step with the trainer's signature."""
  def step(state, batch, key):
    def loss_fn(w):
      x = batch["tokens"].astype(jnp.float32)
      noise = jax.random.normal(key, ())
      return jnp.mean((x @ w - noise) ** 2 * batch["mask"][:, :1])
    loss, g = jax.value_and_grad(loss_fn)(state["w"])
    if axis_name is not None:
      loss, g = jax.lax.pmean((loss, g), axis_name)
    return {"w": state["w"] - 0.01 * g}, {"loss": loss}
  return step


@pytest.mark.parametrize("mode", sorted(sharding.PARALLEL))
def test_modes_on_one_device_equal_the_plain_jitted_step(mode):
  mesh = sharding.make_mesh(1, 1, devices=jax.devices()[:1])
  batch = {"tokens": np.arange(12, dtype=np.int32).reshape(4, 3) % 5,
           "mask": np.ones((4, 3), np.int32)}
  key = jax.random.key(0)
  init = lambda: {"w": jnp.linspace(-1.0, 1.0, 3)}
  want_state, want = jax.jit(_factory(None))(init(), batch, key)

  par = sharding.PARALLEL[mode](mesh, _factory, init())
  state, metrics = par.step(par.place_state(init()), par.place_batch(batch), key)
  state = par.host_state(state)
  np.testing.assert_allclose(np.mean(metrics["loss"]), want["loss"], rtol=1e-6)
  np.testing.assert_allclose(state["w"], want_state["w"], rtol=1e-6)
  target = par.target(init())
  assert jax.tree.structure(target) == jax.tree.structure(init())
