"""Training with clean conditioning positions (the training-time remedy for
conditioning under uniform and Gaussian noise).

Replacement conditioning imposes the fixed positions on a model trained on
the joint, which reads them as noisy evidence: approximate for uniform and
Gaussian noise (tests/test_conditioning.py measures how far). Diffusion-LM
(Li et al. 2022, sec. 5) and PLAID (Gulrajani & Hashimoto 2023, sec. 5.2)
instead train with a random span kept clean and unnoised in x_t and left out
of the loss, so the network learns p(x0_free | x_t_free, x0_fixed); sampling
then imposes the clean values at every noise level (`Process.condition`).

With continuous latents a clean embedding is told apart from a noisy state,
so the learned conditional is exact in the limit; with uniform noise a clean
token looks like a noisy one and the model learns the mixture.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

Array = jax.Array


def random_spans(key: Array, shape: tuple[int, int], rate: float) -> Array:
  """bool [B, L]: with probability `rate` a sequence gets one contiguous
  span of clean positions (prefix, suffix or middle, from two sorted uniform
  ends), never the whole sequence."""
  use_key, ends_key = jax.random.split(key)
  batch, length = shape
  use_B = jax.random.uniform(use_key, (batch,)) < rate
  ends_Bx2 = jnp.sort(jax.random.randint(ends_key, (batch, 2), 0, length + 1),
                      axis=-1)
  start_B, stop_B = ends_Bx2[:, 0], ends_Bx2[:, 1]
  stop_B = jnp.minimum(stop_B, start_B + length - 1)  # leave one free
  pos_L = jnp.arange(length)
  span_BxL = (pos_L >= start_B[:, None]) & (pos_L < stop_B[:, None])
  return span_BxL & use_B[:, None]


def with_clean(x: Array, clean: Array, cond_BxL: Array) -> Array:
  """x with the positions in cond_BxL replaced by `clean` (ids or latents)."""
  cond = cond_BxL.reshape(cond_BxL.shape + (1,) * (x.ndim - 2))
  return jnp.where(cond, clean, x)


def clean_input_denoiser(denoiser, clean: Array, cond_BxL: Array):
  """The denoiser with its x_t input clean at cond_BxL (predict and the
  fused target_nll); the process's own math still sees its x_t."""
  predict = denoiser.predict

  def clean_predict(x_t, t, *args, **kwargs):
    return predict(with_clean(x_t, clean, cond_BxL), t, *args, **kwargs)

  fused = denoiser.target_nll
  clean_fused = None
  if fused is not None:
    def clean_fused(x_t, t, target, where, **kwargs):
      return fused(with_clean(x_t, clean, cond_BxL), t, target, where,
                   **kwargs)
  return dataclasses.replace(denoiser, predict=clean_predict,
                             target_nll=clean_fused)
