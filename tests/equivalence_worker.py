"""Run by test_equivalence.py in a fresh interpreter with 8 fake devices.

The device count must be fixed before JAX starts, so this cannot run inside
the main pytest process. Every mode is the trainer's own (sharding.PARALLEL
over a mesh) and evaluation is the evaluator's own sharded bound. Prints
one JSON line of results.
"""

import json
import os
import sys

os.environ["JAX_NUM_CPU_DEVICES"] = "8"

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from diffusion_text import config as config_lib, sharding, step as step_lib  # noqa: E402
from diffusion_text.eval import likelihood  # noqa: E402
from diffusion_text.models import build_model  # noqa: E402
from diffusion_text.processes import make_process  # noqa: E402


# Objectives without noise, whose pmap step must equal the others too.
NOISE_FREE = ("ar",)


def _diff(a, b) -> float:
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def one_step(process_name: str):
  cfg = config_lib.load_preset(f"synthetic_{process_name}")
  process = make_process(process_name, vocab_size=8, **cfg.process.options)
  model = build_model(process.model_spec, cfg.model, seed=0)
  graphdef, params = nnx.split(model)
  tx = step_lib.make_optimizer(cfg.train)
  rng = np.random.default_rng(0)
  batch = {"tokens": rng.integers(0, 8, size=(16, 16)).astype(np.int32),
           "mask": np.ones((16, 16), np.int32)}
  key = jax.random.key(3)
  factory = lambda axis: step_lib.make_train_step(graphdef, process, tx, 0.9,
                                                  axis_name=axis)
  meshes = {"1": sharding.make_mesh(1, 1, devices=jax.devices()[:1]),
            "8": sharding.make_mesh(8, 1), "fsdp": sharding.make_mesh(2, 4)}
  if process_name in NOISE_FREE:  # pmap draws per-device noise by design
    meshes["pmap"] = sharding.make_mesh(8, 1)
  results, new_params = {}, {}
  for mode, mesh in meshes.items():
    # A fresh copy each time: the step donates (deletes) its input state.
    state = step_lib.init_state(jax.tree.map(np.array, params), tx)
    par = sharding.PARALLEL["pmap" if mode == "pmap" else "sharded"](
        mesh, factory, state)
    state, metrics = par.step(par.place_state(state), par.place_batch(batch),
                              key)
    results[f"loss_{mode}"] = float(np.mean(metrics["loss"]))
    new_params[mode] = jax.device_get(par.host_state(state).params)
  for mode in set(meshes) - {"1"}:
    results[f"param_diff_{mode}"] = _diff(new_params["1"], new_params[mode])

  # Evaluation on the same meshes: 13 blocks in batches of 8 (the last one
  # padded with masked-out rows) give the same per-block figures anywhere.
  blocks = {k: v[:13].copy() for k, v in batch.items()}
  blocks["mask"][-1, 10:] = 0
  def evaluate(mesh):
    batches = [{k: v[i:i + 8] for k, v in blocks.items()} for i in (0, 8)]
    return likelihood.evaluate(process, graphdef, params, batches, seed=1,
                               log=lambda m: None, mesh=mesh, batch_size=8)
  one, eight, fsdp = (evaluate(meshes[m]) for m in ("1", "8", "fsdp"))
  results["eval_blocks"] = one["num_blocks"]
  for mode, r in (("8", eight), ("fsdp", fsdp)):
    results[f"eval_diff_{mode}"] = abs(r["nats_per_token"] - one["nats_per_token"])
  return results


if __name__ == "__main__":
  assert jax.device_count() == 8, jax.devices()
  print(json.dumps({name: one_step(name) for name in sys.argv[1:]}))
