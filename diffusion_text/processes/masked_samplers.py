"""Confidence-ordered unmasking for the masked process (MaskGIT, Chang et
al. 2022; LLaDA's low-confidence remasking, Nie et al. 2025, sec. 2.4).

Each step unmasks as many [MASK]s as the schedule expects to unmask from t
to s (round(#masked * (a_s - a_t) / (1 - a_t)); all of them at s = 0), but
chooses *which* by the model's confidence instead of at random: a token is
drawn at every masked position and the most confident ones are kept. Not an
ancestral sampler of the model's law -- a greedy-ordered one that trades
diversity for quality at few steps.

Scores (higher = unmask first), by sampler name:
  confidence  log p(drawn token)                   (LLaDA low-confidence)
  margin      p(top-1) - p(top-2)
  entropy     -H(p(x0 | x_t))
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from diffusion_text.processes import draws

Array = jax.Array


def _confidence(logp_BxLxV: Array, x0_BxL: Array) -> Array:
  return jnp.take_along_axis(logp_BxLxV, x0_BxL[..., None], -1)[..., 0]


def _margin(logp_BxLxV: Array, x0_BxL: Array) -> Array:
  del x0_BxL
  top2_BxLx2 = jnp.exp(jax.lax.top_k(logp_BxLxV, 2)[0])
  return top2_BxLx2[..., 0] - top2_BxLx2[..., 1]


def _neg_entropy(logp_BxLxV: Array, x0_BxL: Array) -> Array:
  del x0_BxL
  return jnp.sum(jnp.exp(logp_BxLxV) * logp_BxLxV, axis=-1)


SCORES = {"confidence": _confidence, "margin": _margin,
          "entropy": _neg_entropy}


def confidence_step(process, key: Array, denoiser, x_t: Array, t: Array,
                    s: Array, options, score: str) -> Array:
  """One confidence-ordered step of `process` (a MaskedProcess) t -> s."""
  share_L = process.unmask_share(t, s, x_t.shape[1], options)
  is_mask_BxL = x_t == process.mask_id
  count_B = jnp.round(jnp.sum(is_mask_BxL * share_L, -1)).astype(jnp.int32)
  logits_BxLxV = process.logits(denoiser, x_t, t)
  x0_BxL = draws.draw_where(key, logits_BxLxV, is_mask_BxL, options,
                            capacity=is_mask_BxL.size)
  temperature = options.temperature or 1.0
  logp_BxLxV = jax.nn.log_softmax(logits_BxLxV / temperature, axis=-1)
  eligible_BxL = is_mask_BxL & (share_L > 0)  # semi-AR: this block only
  score_BxL = jnp.where(eligible_BxL, SCORES[score](logp_BxLxV, x0_BxL),
                        -jnp.inf)
  rank_BxL = jnp.argsort(jnp.argsort(-score_BxL, axis=-1), axis=-1)
  unmask_BxL = eligible_BxL & (rank_BxL < count_B[:, None])
  return jnp.where(unmask_BxL, x0_BxL, x_t)


# ReMDM (Wang et al. 2025, sec. 3 and 4.1): the remasking posterior
#   unmasked z_t: stays w.p. 1 - sigma_t, remasks w.p. sigma_t;
#   [MASK]: unmasks to x w.p. (a_s - (1 - sigma_t) a_t) / (1 - a_t),
# with 0 <= sigma_t <= sigma_max = min(1, (1 - a_s) / a_t), so generated
# tokens can be revised. Schedules for sigma_t, by sampler name ("loop" has
# its own clock, below):
REMASKING = {
    "remdm_cap": lambda eta, sigma_max: jnp.minimum(eta, sigma_max),
    "remdm_rescale": lambda eta, sigma_max: eta * sigma_max,
    "remdm_loop": lambda eta, sigma_max: jnp.minimum(eta, sigma_max),
}


def loop_alpha(t: Array, options) -> Array:
  """ReMDM-loop's keep probability on the sampler's clock t in [0, 1]
  (sec. 4.1): rising linearly from 0 to alpha_on over (t_on, 1], held at
  alpha_on over [t_off, t_on], then rising linearly to 1 at t = 0."""
  t_on, t_off = options.remask_t_on, options.remask_t_off
  a_on = options.remask_alpha_on
  first = (1.0 - t) * a_on / jnp.maximum(1.0 - t_on, 1e-12)
  last = 1.0 - t * (1.0 - a_on) / jnp.maximum(t_off, 1e-12)
  return jnp.where(t > t_on, first, jnp.where(t < t_off, last, a_on))


def time_of_alpha(process, a: Array, iterations: int = 40) -> Array:
  """The process time t with alpha(t) = a (bisection; alpha decreases), the
  time the network is trained to see at that noise level."""
  def halve(_, bounds):
    lo, hi = bounds
    mid = 0.5 * (lo + hi)
    above = process.alpha(mid) > a
    return jnp.where(above, mid, lo), jnp.where(above, hi, mid)
  lo, hi = jax.lax.fori_loop(0, iterations, halve,
                             (jnp.float32(0.0), jnp.float32(1.0)))
  return 0.5 * (lo + hi)


def remdm_step(process, key: Array, denoiser, x_t: Array, t: Array,
               s: Array, options, strategy: str) -> Array:
  """One ReMDM step t -> s of `process` (a MaskedProcess); sigma_t = 0
  (eta = 0) is exactly the ancestral step, key for key.

  "remdm_loop" runs on its own noise clock (`loop_alpha`): ancestral steps
  down to alpha_on, then steps at the held level alpha_on that remask
  sigma = min(eta, sigma_max) of the generated tokens and unmask as many
  on average (the "loop"),
  then ancestral steps to the end; the network sees the process time of
  each step's noise level."""
  unmask_key, token_key = jax.random.split(key)
  if strategy == "remdm_loop":
    a_t, a_s = loop_alpha(t, options), loop_alpha(s, options)
    m_t, m_s = 1.0 - a_t, 1.0 - a_s
    remasking = (t <= options.remask_t_on) & (t > options.remask_t_off)
    t_net = time_of_alpha(process, a_t)
  else:
    a_t, a_s = process.alpha(t), process.alpha(s)
    m_t, m_s = process.mask_prob(t), process.mask_prob(s)
    remasking, t_net = jnp.bool_(True), t
  sigma_max = jnp.minimum(1.0, m_s / jnp.maximum(a_t, 1e-12))
  sigma = jnp.where((s <= 0.0) | ~remasking, 0.0,
                    REMASKING[strategy](options.remask_eta, sigma_max))
  p_unmask = jnp.where(s <= 0.0, 1.0, (a_s - (1.0 - sigma) * a_t) / m_t)
  is_mask_BxL = x_t == process.mask_id
  coin_BxL = jax.random.uniform(unmask_key, x_t.shape)
  unmask_BxL = is_mask_BxL & (coin_BxL < p_unmask)
  remask_BxL = ~is_mask_BxL & (coin_BxL < sigma)
  x0_BxL = draws.draw_where(token_key, process.logits(denoiser, x_t, t_net),
                            unmask_BxL, options)
  x_s = jnp.where(unmask_BxL, x0_BxL, x_t)
  return jnp.where(remask_BxL, process.mask_id, x_s)
