"""SEDD with the uniform graph Q_uniform = 11^T/K - I over K = V tokens
(Lou, Meng & Ermon, ICML 2024, sec. 3.3; reference graph_lib.Uniform).

The bound, schedules and sampler plumbing are shared with the absorbing graph
in `sedd.py` (its module docstring derives them); this file holds the score
entropy, the Tweedie denoiser and the samplers particular to this graph.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from diffusion_text.processes import base, transitions
from diffusion_text.processes.base import SamplingOptions
from diffusion_text.processes.sedd import _SEDD, _expand

Array = jax.Array

# Floor on the staggered score: exp(-sigma Q) has negative entries, so an
# imperfect score can give negative Tweedie probabilities. The same floored
# distribution is sampled and scored, so the bound stays valid.
_STAG_FLOOR = 1e-20


@dataclasses.dataclass(frozen=True)
class SEDDUniform(_SEDD):
  """SEDD with Q_uniform = 11^T/K - I over the K = V data tokens.

  The score is log s [B, L, K], log s_y = log p_t(y)/p_t(x_t), with the
  current token's entry set to 0 (the reference model's final scatter).
  """

  IMPOSE_DRAWS = True  # conditioning draws q(x_t | x0), not the clean token

  def __post_init__(self):
    super().__post_init__()
    if self.noise_schedule.alpha_end() == 0.0:
      raise ValueError("the uniform graph needs alpha(1) > 0 (eps > 0)")

  @property
  def transition(self) -> transitions.Uniform:
    return transitions.Uniform(self.vocab_size)

  def rate_matrix(self) -> Array:
    k = self.num_states
    return jnp.full((k, k), 1.0 / k) - jnp.eye(k)

  def score_from_raw(self, raw_BxLxK: Array, x_t: Array, t: Array) -> Array:
    del t
    current_BxLxK = jax.nn.one_hot(x_t, self.num_states, dtype=bool)
    return jnp.where(current_BxLxK, 0.0, raw_BxLxK.astype(jnp.float32))

  def dwdse(self, score: Array, x_t: Array, x0: Array, t_B: Array) -> Array:
    """sigma(t) * score entropy per position [B, L] (graph_lib.score_entropy).

    (1/K) sum_{y != x} r_y h(log s_y - log r_y), h(d) = e^d - 1 - d >= 0,
    with the true ratios r_y = rho (x = x0, rho = (1-a)/(1-a+Ka)), 1/rho
    (y = x0 != x) or 1: the reference's pos - neg + const, term by term.
    Where r <= 1 the term is the reference's s - r (1 + log s - log r) (one
    exponential, absolute error ~ r * 1e-7); the one entry with r = 1/rho
    (up to ~1e9 near t = 0) is r (expm1(d) - d), exact to rounding.
    t: [B] or one per position.
    """
    k = self.num_states
    sch = self.noise_schedule
    a_B, om_B = sch.alpha(t_B), sch.one_minus_alpha(t_B)
    log_rho_B = jnp.log(om_B) - jnp.log(om_B + k * a_B)
    y_K = jnp.arange(k)
    clean = x_t == x0
    log_rho = _expand(log_rho_B, x_t.ndim)
    # Entries y != x_t, x0: r = rho on clean positions, else 1.
    log_r = jnp.where(clean, log_rho, 0.0)[..., None]
    small_BxLxK = jnp.exp(score) - jnp.exp(log_r) * (1.0 + score - log_r)
    small_BxLxK = jnp.where((y_K == x_t[..., None]) | (y_K == x0[..., None]),
                            0.0, small_BxLxK)
    # y = x0 != x_t: r = 1 / rho.
    d_x0 = jnp.take_along_axis(score, x0[..., None], -1)[..., 0] + log_rho
    large = jnp.where(clean, 0.0, (jnp.expm1(d_x0) - d_x0) * jnp.exp(-log_rho))
    rate = _expand(sch.rate(t_B), x_t.ndim)
    return rate * (jnp.sum(small_BxLxK, axis=-1) + large) / k

  def _tweedie(self, score: Array, x_t: Array, beta) -> Array:
    """Unnormalised Tweedie p(x_s | x_t) [B, L, K], beta = alpha_t/alpha_s:
    (exp(-dsigma Q) s)_y * exp(dsigma Q)(x_t, y) (reference staggered_score *
    transp_transition), times beta so nothing is divided by it."""
    k = self.num_states
    beta_BxLx1 = _expand(beta, x_t.ndim + 1)
    s_BxLxK = jnp.exp(score)
    mean_BxLx1 = jnp.sum(s_BxLxK, axis=-1, keepdims=True) / k
    stag_BxLxK = jnp.maximum(s_BxLxK - (1.0 - beta_BxLx1) * mean_BxLx1,
                             _STAG_FLOOR * mean_BxLx1)
    return stag_BxLxK * self.transp_transition(x_t, beta)

  def decoder_log_probs(self, score: Array, x_t: Array, x0: Array,
                        t_B: Array) -> Array:
    """log p_dec(x0 | x_t) [B, L]: Tweedie from t to noise 0 (alpha_0 = 1)."""
    w_BxLxK = self._tweedie(score, x_t, self.alpha(t_B))
    target_BxL = jnp.take_along_axis(w_BxLxK, x0[..., None], -1)[..., 0]
    return jnp.log(target_BxL) - jnp.log(jnp.sum(w_BxLxK, axis=-1))

  def prior_kl_per_token(self) -> float:
    """KL(q(x_1 | x0) || uniform) with q(x0) = a + (1-a)/K, a = alpha(1)."""
    k, a = self.num_states, self.noise_schedule.alpha_end()
    q0 = a + (1.0 - a) / k
    return q0 * math.log(k * q0) + (1.0 - q0) * math.log1p(-a)

  def prior(self, key: Array, shape: tuple[int, int]) -> Array:
    return jax.random.randint(key, shape, 0, self.num_states, jnp.int32)

  def reverse_probs(self, denoiser: base.Denoiser, x_t: Array, t: Array,
                    s: Array, options: SamplingOptions = SamplingOptions()
                    ) -> Array:
    """Unnormalised p(x_s | x_t) [B, L, K] of the chosen sampler; the
    Tweedie denoiser to noise 0 when s <= 0.

    analytic: Tweedie from alpha_t to alpha_s (eq. 19); euler and
    tau_leaping: the chain step of `_UNIFORM_MOVES` off the current token.
    """
    name = self.sampler(options)
    t_B = jnp.full((x_t.shape[0],), t, jnp.float32)
    score = self.log_score(denoiser, x_t, t_B)
    a_t = self.alpha(t)
    final = s <= 0.0
    if name == "analytic":
      beta = jnp.where(final, a_t, a_t / self.alpha(s))
      return self._tweedie(score, x_t, beta)
    move_fn = _UNIFORM_MOVES[name]
    current_BxLxK = jax.nn.one_hot(x_t, self.num_states, dtype=bool)

    def chain_step(score):
      s_BxLxK = jnp.where(current_BxLxK, 0.0, jnp.exp(score))
      out_BxL = jnp.sum(s_BxLxK, axis=-1)
      step = (t - s) * self.noise_schedule.rate(t) / self.num_states
      move_BxLxK, stay_BxL = move_fn(step, s_BxLxK, out_BxL)
      return jnp.where(current_BxLxK, stay_BxL[..., None], move_BxLxK)

    return jax.lax.cond(final, lambda sc: self._tweedie(sc, x_t, a_t),
                        chain_step, score)


def _euler_move(step, s_BxLxK: Array, out_BxL: Array):
  """Euler (eq. 17): move (t-s) sigma s_y / K, stay with the rest (>= 0)."""
  return step * s_BxLxK, jnp.maximum(1.0 - step * out_BxL, 0.0)


def _tau_leaping_move(step, s_BxLxK: Array, out_BxL: Array):
  """P(jump) = 1 - exp(-(t-s) R), R = sigma sum_{y != x} s_y / K, split in
  proportion to s_y."""
  x_BxL = step * out_BxL
  # (1 - e^-x) / x, -> 1 as x -> 0.
  safe_BxL = jnp.maximum(x_BxL, 1e-6)
  phi_BxL = jnp.where(x_BxL > 1e-6, -jnp.expm1(-safe_BxL) / safe_BxL,
                      1.0 - 0.5 * x_BxL)
  return (step * phi_BxL)[..., None] * s_BxLxK, 1.0 - x_BxL * phi_BxL


# chain sampler name -> (step, s off the current token, their sum) ->
# (move weights, stay weight); 'analytic' is the Tweedie step itself.
_UNIFORM_MOVES = {"euler": _euler_move, "tau_leaping": _tau_leaping_move}
