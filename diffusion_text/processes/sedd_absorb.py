"""SEDD on the absorbing graph Q_absorb (see sedd.py for the process, its
bound and samplers): every token jumps to [MASK] = id vocab_size, K = V + 1
states. The uniform graph lives in `sedd_uniform.py`.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from diffusion_text.contract import cross_entropy
from diffusion_text.processes import base, draws, transitions
from diffusion_text.processes.base import SamplingOptions
from diffusion_text.processes.schedules import Schedule
from diffusion_text.processes.sedd import _SEDD, _expand

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class SEDDAbsorb(transitions.AbsorbingStates, _SEDD):
  """SEDD with Q_absorb: states 0..V-1 and [MASK] = V.

  The score is kept as log s_hat = log s - log(alpha / (1 - alpha)) over the V
  data tokens: at a masked position the true s_hat_y is p(x_0 = y | the
  unmasked tokens), so every formula below is finite for all t (MDLM-like).
  Only masked positions ever move or carry a loss, and their current token is
  [MASK], so the reference's zeroing of the current token's score is the
  dropped [MASK] column; the network's [MASK] output column is unused.
  """

  # Reference model `scale_by_sigma`: raw outputs are shifted by
  # -log(e^sigma_bar - 1) - log V, i.e. log s_hat = raw - log V.
  scale_by_sigma: bool = True

  def __post_init__(self):
    super().__post_init__()
    if self.noise_schedule.alpha_end() == 0.0 and not self.scale_by_sigma:
      raise ValueError("eps=0 (sigma_bar(1) = inf) needs scale_by_sigma=True")

  def rate_matrix(self) -> Array:
    k = self.num_states
    q_KxK = jnp.zeros((k, k)).at[:, self.mask_id].set(1.0) - jnp.eye(k)
    return q_KxK.at[self.mask_id].set(0.0)

  def score_from_raw(self, raw_BxLxK: Array, x_t: Array, t: Array) -> Array:
    """log s_hat [B, L, V] from the network's raw output [B, L, V+1]; t
    broadcasts against x_t (any leading shape)."""
    raw_BxLxV = raw_BxLxK[..., :self.vocab_size].astype(jnp.float32)
    if self.scale_by_sigma:
      return raw_BxLxV - math.log(self.vocab_size)
    s = self.noise_schedule
    odds = jnp.log(s.one_minus_alpha(t)) - jnp.log(s.alpha(t))
    return raw_BxLxV + _expand(odds, x_t.ndim)[..., None]

  def dwdse(self, score: Array, x_t: Array, x0: Array, t_B: Array) -> Array:
    """sigma(t) * score entropy per position [B, L] (graph_lib.score_entropy:
    ratio (sum s_hat - log s_hat_x0 - 1) at [MASK], ratio = alpha/(1-alpha));
    t: [B] or one per position."""
    lse_BxL = jax.nn.logsumexp(score, axis=-1)
    target_BxL = jnp.take_along_axis(score, x0[..., None], -1)[..., 0]
    return self._weighted_se(lse_BxL, target_BxL, x_t, t_B)

  def _weighted_se(self, lse_BxL: Array, target_BxL: Array, x_t: Array,
                   t: Array) -> Array:
    """dwdse from the score's logsumexp and its value at x0."""
    s = self.noise_schedule
    weight = -s.dalpha(t) / s.one_minus_alpha(t)   # = sigma * ratio
    # sum s_hat - 1 - log s_hat_x0 >= expm1(lse) - lse >= 0, stably.
    se_BxL = jnp.expm1(lse_BxL) - target_BxL
    return jnp.where(x_t == self.mask_id,
                     _expand(weight, x_t.ndim) * se_BxL, 0.0)

  def _position_terms(self, denoiser: base.Denoiser, x_t: Array, x0: Array,
                      t_B: Array, weights) -> tuple[Array, Array]:
    """Both terms live at [MASK] only and need two numbers there, the
    score's logsumexp and its value at x0: the fused head at masked
    positions (base.target_lse) over the V data columns gives both (the
    score entropy is not linear in them, so `weights` cannot be passed on)."""
    del weights
    at_mask = x_t == self.mask_id
    ce_BxL, lse_raw_BxL = base.target_lse(
        denoiser, x_t, self.network_time(t_B), x0, at_mask, self.vocab_size)
    # score = raw + shift (score_from_raw), so lse shifts and ce does not.
    shift = self.score_from_raw(jnp.zeros((1, 1, self.vocab_size)),
                                x_t[:1, :1], _expand(t_B, 2))[..., 0]
    lse_BxL = lse_raw_BxL + shift
    return (self._weighted_se(lse_BxL, lse_BxL - ce_BxL, x_t, t_B),
            jnp.where(at_mask, -ce_BxL, 0.0))

  def decoder_log_probs(self, score: Array, x_t: Array, x0: Array,
                        t_B: Array) -> Array:
    """log p_dec(x0 | x_t) [B, L]: softmax(log s_hat) at [MASK], else exact."""
    del t_B
    return jnp.where(x_t == self.mask_id, -cross_entropy(score, x0), 0.0)

  def prior_kl_per_token(self) -> float:
    """KL((a delta_x0 + (1-a) delta_M) || p_base) = a log V, a = alpha(1)."""
    return self.transition.base_prior_kl(self.noise_schedule.alpha_end())

  def prior(self, key: Array, shape: tuple[int, int]) -> Array:
    return self.transition.base_prior(key, shape,
                                      self.noise_schedule.alpha_end())

  def _unmask_weights(self, denoiser: base.Denoiser, x_t: Array, t: Array,
                      s: Array, options: SamplingOptions):
    """(log s_hat [B, L, V], c, stay [B, L], sum_y s_hat_y [B, L]): at
    [MASK] the step unmasks to y with weight c * s_hat_y and stays with
    `stay` (`_ABSORB_STEPS`); the denoiser (s <= 0) has c = 1 and never
    stays (reference `Denoiser`)."""
    step_fn = _ABSORB_STEPS[self.sampler(options)]
    t_B = jnp.full((x_t.shape[0],), t, jnp.float32)
    log_s_hat_BxLxV = self.log_score(denoiser, x_t, t_B)
    total_BxL = jnp.sum(jnp.exp(log_s_hat_BxLxV), axis=-1)
    c, stay_BxL = step_fn(self.noise_schedule, t, s, total_BxL)
    final = s <= 0.0
    c = jnp.where(final, 1.0, c)
    stay_BxL = jnp.where(final, 0.0, stay_BxL)
    return log_s_hat_BxLxV, c, stay_BxL, total_BxL

  def reverse_probs(self, denoiser: base.Denoiser, x_t: Array, t: Array,
                    s: Array, options: SamplingOptions = SamplingOptions()
                    ) -> Array:
    """Unnormalised p(x_s | x_t) [B, L, V+1] of the chosen sampler
    (`_unmask_weights`; positions off [MASK] keep their token)."""
    log_s_hat_BxLxV, c, stay_BxL, _ = self._unmask_weights(
        denoiser, x_t, t, s, options)
    probs_BxLxK = jnp.concatenate(
        [jnp.asarray(c)[..., None] * jnp.exp(log_s_hat_BxLxV),
         stay_BxL[..., None]], -1)
    keep_BxLxK = jax.nn.one_hot(x_t, self.num_states)
    return jnp.where((x_t == self.mask_id)[..., None], probs_BxLxK, keep_BxLxK)

  def reverse_step(self, key: Array, denoiser: base.Denoiser, x_t: Array,
                   t: Array, s: Array,
                   options: SamplingOptions = SamplingOptions()) -> Array:
    """A draw from `reverse_probs` without building it: a [MASK] unmasks
    with probability c sum s_hat / (c sum s_hat + stay), and only the
    positions that unmask draw a token, from s_hat (`draws.draw_where`)."""
    log_s_hat_BxLxV, c, stay_BxL, total_BxL = self._unmask_weights(
        denoiser, x_t, t, s, options)
    unmask_key, draw_key = jax.random.split(key)
    move_BxL = c * total_BxL
    u_BxL = jax.random.uniform(unmask_key, x_t.shape)
    unmask_BxL = ((x_t == self.mask_id)
                  & (u_BxL * (move_BxL + stay_BxL) < move_BxL))
    tokens_BxL = draws.draw_where(draw_key, log_s_hat_BxLxV, unmask_BxL,
                                  SamplingOptions(float64=options.float64))
    return jnp.where(unmask_BxL, tokens_BxL, x_t).astype(jnp.int32)


def _absorb_rate(sch: Schedule, t, s):
  """(t - s) sigma(t) alpha_t / (1 - alpha_t): the unmasking rate over a step."""
  return (t - s) * -sch.dalpha(t) / sch.one_minus_alpha(t)


def _absorb_euler(sch: Schedule, t, s, total_BxL):
  """Euler (eq. 17): c = (t - s) sigma ratio."""
  c = _absorb_rate(sch, t, s)
  return c, jnp.maximum(1.0 - c * total_BxL, 0.0)


def _absorb_tau_leaping(sch: Schedule, t, s, total_BxL):
  """Rates frozen at t: c = P(jump) / sum s_hat, never a negative stay."""
  jump_BxL = -jnp.expm1(-_absorb_rate(sch, t, s) * total_BxL)
  return jump_BxL / total_BxL, 1.0 - jump_BxL


def _absorb_analytic(sch: Schedule, t, s, total_BxL):
  """Tweedie (eq. 19): c = (alpha_s - alpha_t) / (1 - alpha_t)."""
  c = (sch.alpha(s) - sch.alpha(t)) / sch.one_minus_alpha(t)
  return c, jnp.maximum(1.0 - c * total_BxL, 0.0)


# sampler name -> (schedule, t, s, sum s_hat) -> (unmask coefficient c, stay)
_ABSORB_STEPS = {
    "euler": _absorb_euler,
    "tau_leaping": _absorb_tau_leaping,
    "analytic": _absorb_analytic,
}
