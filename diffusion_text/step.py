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
  skipped: Any = 0         # int32 scalar: updates skipped as non-finite
  streak: Any = 0          # int32 scalar: consecutive skips up to now


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
                    ema=jax.tree.map(jnp.copy, params),
                    skipped=jnp.zeros((), jnp.int32),
                    streak=jnp.zeros((), jnp.int32))


def _ema_update(ema, params, step, decay: float):
  if decay <= 0:
    return params
  # Warm-started EMA (as in big_vision): early averages are not dominated by
  # the random initialisation.
  d = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
  return jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, ema, params)


def _loss_and_grads(params, batch: dict, key: jax.Array, *, graphdef,
                    process: Process):
  def loss_fn(params):
    denoiser = as_denoiser(nnx.merge(graphdef, params))
    out = process.train_loss(key, denoiser, batch["tokens"], batch["mask"])
    return out.loss, out.metrics

  return jax.value_and_grad(loss_fn, has_aux=True)(params)


def _accumulated_grads(params, batch: dict, key: jax.Array, *, graphdef,
                       process: Process, grad_accum: int):
  """((loss, metrics), grads) of `batch`, in `grad_accum` micro-batches.

  Gradient accumulation: a lax.scan over micro-batches sums their losses,
  metrics and gradients, so activations of only B / grad_accum rows are
  alive at once; the means equal the whole batch's whenever the loss is a
  mean over equally weighted rows (full blocks). Micro-batch i takes rows
  i, i + A, i + 2A, ... (A = grad_accum): each device's contiguous shard of
  the batch then holds its share of every micro-batch, so splitting moves
  no data between devices. Micro-batch i draws its noise from
  fold_in(key, i); grad_accum=1 uses `key` itself.
  """
  grads_of = functools.partial(_loss_and_grads, graphdef=graphdef,
                               process=process)
  if grad_accum == 1:
    return grads_of(params, batch, key)
  micro = jax.tree.map(
      lambda x_BxL: x_BxL.reshape(
          (-1, grad_accum) + x_BxL.shape[1:]).swapaxes(0, 1), batch)

  def add_micro(total, i_and_micro):
    i, micro_batch = i_and_micro
    out = grads_of(params, micro_batch, jax.random.fold_in(key, i))
    return jax.tree.map(jnp.add, total, out), None

  zeros = jax.tree.map(
      jnp.zeros_like,
      jax.eval_shape(grads_of, params, jax.tree.map(lambda x: x[0], micro),
                     key))
  total, _ = jax.lax.scan(add_micro, zeros,
                          (jnp.arange(grad_accum), micro))
  return jax.tree.map(lambda x: x / grad_accum, total)


def train_step(state: TrainState, batch: dict, key: jax.Array, *, graphdef,
               process: Process, tx: optax.GradientTransformation,
               ema_decay: float, axis_name: Optional[str] = None,
               grad_accum: int = 1):
  """One optimizer step on `batch` = {'tokens': [B, L], 'mask': [B, L]},
  its gradient averaged over `grad_accum` micro-batches of B / grad_accum."""
  if axis_name is not None:
    # pmap: each device draws its own noise for its shard of the batch.
    key = jax.random.fold_in(key, jax.lax.axis_index(axis_name))

  (loss, metrics), grads = _accumulated_grads(
      state.params, batch, key, graphdef=graphdef, process=process,
      grad_accum=grad_accum)
  if axis_name is not None:
    grads = jax.lax.pmean(grads, axis_name)
    loss, metrics = jax.lax.pmean((loss, metrics), axis_name)
  grad_norm = optax.tree.norm(grads)

  def update(parts):
    params, opt_state, ema = parts
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return params, opt_state, _ema_update(ema, params, state.step, ema_decay)

  new = _update_if_finite(state, loss, grad_norm, update)
  metrics = dict(metrics, loss=loss, grad_norm=grad_norm,
                 skipped=(new.streak > 0).astype(jnp.float32),
                 streak=new.streak.astype(jnp.float32))
  return new, metrics


def _update_if_finite(state: TrainState, loss, grad_norm, update
                      ) -> TrainState:
  """`state` advanced by `update((params, opt_state, ema))`, or left as it
  is if the loss or gradient norm is non-finite (a NaN/inf step is skipped
  on device; no host sync). A finite step is the update bit for bit.

  The update runs inside `lax.cond` rather than being computed and then
  selected against the old state: around a select XLA:CPU copied every
  donated parameter and optimizer buffer (~150 copies, ~3% of the step's
  operation time); under the cond the update writes in place and the skip
  branch passes the buffers through.
  """
  ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  params, opt_state, ema = jax.lax.cond(
      ok, update, lambda parts: parts,
      (state.params, state.opt_state, state.ema))
  return TrainState(state.step + 1, params, opt_state, ema,
                    state.skipped + (~ok).astype(jnp.int32),
                    jnp.where(ok, 0, state.streak + 1).astype(jnp.int32))


def all_finite(tree) -> jax.Array:
  """One device scalar: every floating leaf of `tree` is finite."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def bound_step(params, batch: dict, key: jax.Array, *, graphdef,
               process: Process):
  """Per-sequence NLL bound (nats [B]) and its named terms."""
  denoiser = as_denoiser(nnx.merge(graphdef, params))
  bound = process.nll_bound(key, denoiser, batch["tokens"], batch["mask"])
  return bound.nats, bound.terms


def make_train_step(graphdef, process: Process, tx, ema_decay: float,
                    axis_name: Optional[str] = None, grad_accum: int = 1):
  return functools.partial(train_step, graphdef=graphdef, process=process,
                           tx=tx, ema_decay=ema_decay, axis_name=axis_name,
                           grad_accum=grad_accum)
