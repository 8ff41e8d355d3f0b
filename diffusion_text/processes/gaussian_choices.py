"""The named choices of the discrete-time Gaussian process (gaussian.py),
one registry each:

  PROPOSALS          step_proposal -> the law p(i) of the bound's step i
  REVERSE_VARIANCES  reverse_variance -> sigma^2 of p(x_s | x_t) and its KL
  TRAIN_DRAWS        train_steps -> how the loss draws its step
  SAMPLER_STEPS      SamplingOptions.sampler -> one reverse step's mean, var
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


def bcast(v, x):
  """A scalar or per-example [B] value shaped to broadcast against x [B, ...]."""
  v = jnp.asarray(v, jnp.float32)
  return v.reshape(v.shape + (1,) * (x.ndim - v.ndim))


def check_choice(name: str, value: str, registry) -> None:
  if value not in registry:
    raise ValueError(f"unknown {name} {value!r} for process 'gaussian'; "
                     f"choose one of: {', '.join(registry)}")


Array = jax.Array

_TINY = 1e-12
_ANCHORS = 256  # rows of E whose nearest neighbours set the proposal's cut-off


def uniform_probs(p, denoiser) -> Array:
  """The plain law: (T - 1) KL_i is the estimate."""
  del denoiser
  T = p.num_steps
  if T < 2:
    return jnp.zeros((0,), jnp.float32)
  return jnp.full((T - 1,), 1.0 / (T - 1), jnp.float32)


def table_probs(p, denoiser) -> Array:
  """p(i) where a Gaussian source of the table's variance reveals information.

  Models the KL mass per unit of lambda = log SNR as that of a Gaussian
  source of the table's per-dimension variance s2 (I-MMSE,
  ~ s2 SNR / (1 + s2 SNR)) cut off where the nearest token at squared
  distance d2 is resolved (pairwise error ~ exp(-SNR d2 / 8)):
    p(i) ~ (lambda_{i-1} - lambda_i) s2 SNR_i / (1 + s2 SNR_i)
           * exp(-SNR_i d2 / 8),
  mixed with `proposal_floor` of the uniform law. s2 and d2 come from the
  (stop-gradient) table: O(V D + min(V, 256) V D + T) per call.
  """
  T = p.num_steps
  uniform = uniform_probs(p, denoiser)
  if T < 2:
    return uniform
  with jax.ensure_compile_time_eval():
    ab = np.asarray(p.alpha_bar(jnp.arange(1, T + 1) / T), np.float64)
  log_snr = np.log(ab) - np.log1p(-np.minimum(ab, 1.0 - 1e-12))
  dlam_I = jnp.asarray(np.maximum(log_snr[:-1] - log_snr[1:], 0.0),
                       jnp.float32)
  snr_I = jnp.asarray(np.exp(log_snr[1:]), jnp.float32)
  table_VxD = jax.lax.stop_gradient(p.embedding_table(denoiser))
  s2 = jnp.mean(jnp.square(table_VxD - table_VxD.mean(0)))
  anchors_KxD = table_VxD[:_ANCHORS]  # the first rows: cheap, fixed
  d2_KxV = (jnp.sum(jnp.square(anchors_KxD), -1)[:, None]
            + jnp.sum(jnp.square(table_VxD), -1)[None]
            - 2.0 * anchors_KxD @ table_VxD.T)
  self_KxV = (jnp.arange(anchors_KxD.shape[0])[:, None]
              == jnp.arange(p.vocab_size)[None])
  # The smallest gap found: an underestimate only widens the proposal.
  d2 = jnp.maximum(jnp.min(jnp.where(self_KxV, jnp.inf, d2_KxV)), 0.0)
  d2 = jnp.where(jnp.isfinite(d2), d2, 0.0)  # V == 1
  shape_I = (dlam_I * s2 * snr_I / (1.0 + s2 * snr_I)
             * jnp.exp(-snr_I * d2 / 8.0))
  total = jnp.sum(shape_I)
  shape_I = jnp.where(total > 0, shape_I / jnp.maximum(total, _TINY),
                      uniform)
  return ((1.0 - p.proposal_floor) * shape_I
          + p.proposal_floor * uniform)


# step_proposal -> (process, denoiser) -> p(i) for i = 2..T, [T - 1]
PROPOSALS = {"table": table_probs, "uniform": uniform_probs}


def _ddpm_step(p, x_t, x0_hat, eps_hat, s, t):
  """Ancestral (Ho Algorithm 2): the posterior mean at x0_hat, sigma^2."""
  del eps_hat
  mean, _ = p.posterior_mean_variance(x_t, x0_hat, s, t)
  return mean, p.reverse_variance_at(s, t)


def _ddim_step(p, x_t, x0_hat, eps_hat, s, t):
  """DDIM (Song et al. 2021 eq. 12) with stochasticity `ddim_eta`."""
  del x_t
  ab_t, ab_s = p.alpha_bar(t), p.alpha_bar(s)
  var = p.ddim_eta ** 2 * (1.0 - ab_s) / (1.0 - ab_t) * (1.0 - ab_t / ab_s)
  mean = (jnp.sqrt(ab_s) * x0_hat
          + jnp.sqrt(jnp.maximum(1.0 - ab_s - var, 0.0)) * eps_hat)
  return mean, var


# sampler name -> (process, x_t, x0_hat, eps_hat, s, t) -> (mean, variance)
SAMPLER_STEPS = {"ddpm": _ddpm_step, "ddim": _ddim_step}


class _Variance(NamedTuple):
  """sigma^2 of p(x_s | x_t) and the KL's (weight on ||eps - eps_hat||^2,
  constant) against q(x_s | x_t, x_0), both from (ab_s, ab_t, D)."""

  variance: Callable
  kl_parts: Callable


def _posterior_kl_parts(ab_s, ab_t, dim):
  del dim
  return (ab_s - ab_t) / (ab_t * (1.0 - ab_s)), 0.0  # SNR_s / SNR_t - 1


def _beta_kl_parts(ab_s, ab_t, dim):
  var_ratio = (1.0 - ab_s) / (1.0 - ab_t)  # beta~ / beta
  return ((ab_s - ab_t) / (ab_t * (1.0 - ab_t)),
          dim * (var_ratio - 1.0 - jnp.log(var_ratio)))


REVERSE_VARIANCES = {
    "posterior": _Variance(
        lambda ab_s, ab_t: (1.0 - ab_t / ab_s) * (1.0 - ab_s) / (1.0 - ab_t),
        _posterior_kl_parts),
    "beta": _Variance(lambda ab_s, ab_t: 1.0 - ab_t / ab_s, _beta_kl_parts),
}


def _proposal_draw(p, key, batch, denoiser):
  return p.sample_step(key, batch, denoiser)


def _uniform_draw(p, key, batch, denoiser):
  """Uniform on {1..T}: T * KL_i * [i >= 2] is unbiased for the sum."""
  del denoiser
  step_B = jax.random.randint(key, (batch,), 1, p.num_steps + 1)
  return step_B, jnp.where(step_B >= 2, float(p.num_steps), 0.0)


# train_steps -> (process, key, batch, denoiser) -> (steps [B], 1 / p [B])
TRAIN_DRAWS = {"proposal": _proposal_draw, "uniform": _uniform_draw}
