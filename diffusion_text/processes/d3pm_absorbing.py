"""D3PM on the absorbing graph (see categorical.py for the process, its bound
and loss): Q_t = (1 - b_t) I + b_t 1 e_m^T with [MASK] m = V, prior
all [MASK].
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.scipy.special import xlogy

from diffusion_text.processes import transitions
from diffusion_text.processes.base import target_nll
from diffusion_text.processes.categorical import (_TINY, D3PM, _draw_where,
                                                  _take)

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class D3PMAbsorbing(D3PM):
  """Q_t = (1 - b_t) I + b_t 1 e_m^T with [MASK] m = V; prior: all [MASK].

  alpha_bar(1) is 0 exactly, so q(x_T | x0) is the all-mask prior.
  """

  schedule: str = "linear"  # alpha = 1 - t: D3PM's b_i = 1 / (T - i + 1)

  @property
  def mask_id(self) -> int:
    return self.transition.mask_id

  @property
  def transition(self) -> transitions.Absorbing:
    return transitions.Absorbing(self.vocab_size)

  def alpha_bar(self, t: Array) -> Array:
    t = jnp.asarray(t, jnp.float32)
    return jnp.where(t >= 1.0, 0.0, super().alpha_bar(t))

  def _step_term(self, logits_BxLxV, lse_BxL, probs_BxLxV, x_t, x0, a_s,
                 a_t):
    del probs_BxLxV
    # Zero unless x_t is masked; there q(x_s = x0 | ...) = (a_s - a_t)/(1 - a_t)
    # and p puts p~ on the same mass, so KL = that weight times -log p~(x0).
    nll = lse_BxL - _take(logits_BxLxV, x0)  # cross_entropy, lse reused
    return self._masked_step(nll, x_t, a_s, a_t)

  @staticmethod
  def _kl_weight(a_s, a_t):
    return (a_s - a_t) / jnp.maximum(1.0 - a_t, _TINY)

  def _masked_step(self, nll, x_t, a_s, a_t):
    return jnp.where(x_t == self.mask_id, self._kl_weight(a_s, a_t) * nll, 0.0)

  def _ce_positions(self, x_t):
    return x_t == self.mask_id

  def _position_terms(self, denoiser, x_t, t_B, x0, a_s, a_t, weights):
    # Both terms live at [MASK] only: the head and softmax run there alone,
    # each position's CE weighted step_weight * kl_weight + ce_weight.
    step_w, ce_w = weights
    nll = target_nll(denoiser, x_t, t_B, x0, x_t == self.mask_id,
                     weights=step_w * self._kl_weight(a_s, a_t) + ce_w)
    return self._masked_step(nll, x_t, a_s, a_t), nll

  def _prior_kl(self, a_T):
    # KL(a_T e_x0 + (1 - a_T) e_m || e_m): infinite unless a_T = 0.
    return xlogy(1.0 - a_T, 1.0 - a_T) + jnp.where(a_T > 0, jnp.inf, 0.0)

  def prior(self, key: Array, shape: tuple[int, int]) -> Array:
    del key
    return jnp.full(shape, self.mask_id, jnp.int32)

  def _reverse_sample(self, key, logits_BxLxV, x_t, a_s, a_t, at_zero,
                      float64):
    # Only masked positions can change: unmask with prob (a_s - a_t)/(1 - a_t)
    # (exactly 1 at s = 0, so no [MASK] survives the last step).
    unmask_w = jnp.where(at_zero, 1.0, self._kl_weight(a_s, a_t))
    choice_key, draw_key = jax.random.split(key)
    unmask = ((x_t == self.mask_id)
              & (jax.random.uniform(choice_key, x_t.shape) < unmask_w))
    x0_hat = _draw_where(draw_key, logits_BxLxV, unmask, float64)
    return jnp.where(unmask, x0_hat, x_t).astype(x_t.dtype)
