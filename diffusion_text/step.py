"""Pure train and eval steps (no IO), jit- or pmap-compiled by the caller.

The model crosses the jit boundary as plain pytrees: `graphdef, params =
nnx.split(model)`; inside the step `nnx.merge` rebuilds it and the process
receives it as a `Denoiser`. One step function serves every parallelism
mode: under `jax.jit` with NamedShardings XLA inserts the collectives; under
`jax.pmap` the caller passes `axis_name` and gradients are averaged here.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from diffusion_text.config import TrainConfig
from diffusion_text.models import as_denoiser
from diffusion_text.processes import Process


class TrainState(NamedTuple):
  step: jax.Array          # int32 scalar: optimizer steps taken
  params: Any              # nnx.State of the model's parameters
  opt_state: Any           # optax state
  ema: Any                 # exponential moving average of params


def learning_rate(cfg: TrainConfig) -> optax.Schedule:
  """Linear warmup to cfg.lr, then cosine decay to cfg.lr * min_lr_ratio."""
  warmup = max(min(cfg.warmup_steps, cfg.steps - 1), 0)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=cfg.lr, warmup_steps=warmup,
      decay_steps=max(cfg.steps, warmup + 1), end_value=cfg.lr * cfg.min_lr_ratio)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
  # Decay only matrices: biases, norms and scalar schedule params stay free.
  decay_mask = lambda params: jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)
  parts = []
  if cfg.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(cfg.grad_clip))
  parts.append(optax.adamw(learning_rate(cfg), b1=cfg.b1, b2=cfg.b2,
                           weight_decay=cfg.weight_decay, mask=decay_mask))
  return optax.chain(*parts)


def init_state(params, tx: optax.GradientTransformation) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=tx.init(params),
                    ema=jax.tree.map(jnp.copy, params))


def _ema_update(ema, params, step, decay: float):
  if decay <= 0:
    return params
  # Warm-started EMA (as in big_vision): early averages are not dominated by
  # the random initialisation.
  d = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
  return jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, ema, params)


def train_step(state: TrainState, batch: dict, key: jax.Array, *, graphdef,
               process: Process, tx: optax.GradientTransformation,
               ema_decay: float, axis_name: Optional[str] = None):
  """One optimizer step on `batch` = {'tokens': [B, L], 'mask': [B, L]}."""
  if axis_name is not None:
    # pmap: each device draws its own noise for its shard of the batch.
    key = jax.random.fold_in(key, jax.lax.axis_index(axis_name))

  def loss_fn(params):
    denoiser = as_denoiser(nnx.merge(graphdef, params))
    out = process.train_loss(key, denoiser, batch["tokens"], batch["mask"])
    return out.loss, out.metrics

  (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params)
  if axis_name is not None:
    grads = jax.lax.pmean(grads, axis_name)
    loss, metrics = jax.lax.pmean((loss, metrics), axis_name)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema = _ema_update(state.ema, params, state.step, ema_decay)
  metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads))
  return TrainState(state.step + 1, params, opt_state, ema), metrics


def bound_step(params, batch: dict, key: jax.Array, *, graphdef,
               process: Process):
  """Per-sequence NLL bound (nats [B]) and its named terms."""
  denoiser = as_denoiser(nnx.merge(graphdef, params))
  bound = process.nll_bound(key, denoiser, batch["tokens"], batch["mask"])
  return bound.nats, bound.terms


def make_train_step(graphdef, process: Process, tx, ema_decay: float,
                    axis_name: Optional[str] = None):
  return functools.partial(train_step, graphdef=graphdef, process=process,
                           tx=tx, ema_decay=ema_decay, axis_name=axis_name)
