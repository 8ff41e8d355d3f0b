"""Run by test_equivalence.py in a fresh interpreter with 8 fake devices.

The device count must be fixed before JAX starts, so this cannot run inside
the main pytest process. Prints one JSON line of results.
"""

import json
import os
import sys

os.environ["JAX_NUM_CPU_DEVICES"] = "8"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from diffusion_text import config as config_lib, sharding, step as step_lib  # noqa: E402
from diffusion_text.models import build_model  # noqa: E402
from diffusion_text.processes import make_process  # noqa: E402


def one_step(process_name: str):
  cfg = config_lib.load_preset(f"synthetic_{process_name}")
  process = make_process(process_name, vocab_size=8)
  model = build_model(process.model_spec, cfg.model, seed=0)
  graphdef, params = nnx.split(model)
  tx = step_lib.make_optimizer(cfg.train)
  rng = np.random.default_rng(0)
  batch = {"tokens": rng.integers(0, 8, size=(16, 16)).astype(np.int32),
           "mask": np.ones((16, 16), np.int32)}
  key = jax.random.key(3)
  results = {}

  def run(mesh):
    state = step_lib.init_state(params, tx)
    st_sh = sharding.state_shardings(state, mesh)
    fn = jax.jit(step_lib.make_train_step(graphdef, process, tx, 0.9),
                 in_shardings=(st_sh, sharding.batch_sharding(mesh),
                               sharding.replicated(mesh)),
                 out_shardings=(st_sh, sharding.replicated(mesh)))
    state, metrics = fn(jax.device_put(state, st_sh),
                        sharding.global_batch(batch, mesh), key)
    return float(metrics["loss"]), jax.device_get(state.params)

  loss1, p1 = run(sharding.make_mesh(1, 1, devices=jax.devices()[:1]))
  loss8, p8 = run(sharding.make_mesh(8, 1))
  loss_fsdp, p_fsdp = run(sharding.make_mesh(2, 4))
  results["loss_1"] = loss1
  results["loss_8"] = loss8
  results["loss_fsdp"] = loss_fsdp
  diff = lambda a, b: max(float(np.max(np.abs(x - y))) for x, y in zip(
      jax.tree.leaves(a), jax.tree.leaves(b)))
  results["param_diff_8"] = diff(p1, p8)
  results["param_diff_fsdp"] = diff(p1, p_fsdp)

  # pmap over the same 8 devices.
  state = step_lib.init_state(params, tx)
  rep = jax.tree.map(lambda x: jnp.broadcast_to(x, (8,) + x.shape), state)
  fn = jax.pmap(step_lib.make_train_step(graphdef, process, tx, 0.9,
                                         axis_name="batch"),
                axis_name="batch", in_axes=(0, 0, None))
  pbatch = {k: v.reshape(8, 2, 16) for k, v in batch.items()}
  state_p, metrics_p = fn(rep, pbatch, key)
  results["loss_pmap"] = float(metrics_p["loss"][0])
  results["param_diff_pmap"] = diff(p1, jax.tree.map(lambda x: x[0],
                                                     jax.device_get(state_p.params)))
  return results


if __name__ == "__main__":
  assert jax.device_count() == 8, jax.devices()
  print(json.dumps({name: one_step(name) for name in sys.argv[1:]}))
