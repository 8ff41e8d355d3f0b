"""SEDD: score entropy discrete diffusion (Lou, Meng & Ermon, ICML 2024).

Each token follows a continuous-time Markov chain with rates sigma(t) Q (SEDD
eq. 3-4) and total noise sigma_bar(t) = int_0^t sigma, so that
q(x_t | x_0) = exp(sigma_bar(t) Q)[x_0] (sec. 3.3). Q is Q_absorb (every token
jumps to [MASK] = id vocab_size; K = V + 1 states) or Q_uniform = 11^T/K - I
(K = V). The network estimates the concrete score s(x_t, t)_y = p_t(y)/p_t(x)
for every single-token change (eq. 7) and is trained with the denoising score
entropy weighted by sigma(t) (DWDSE, eq. 9 and 11).

Follows the reference code (louaaron/Score-Entropy-Discrete-Diffusion:
noise_lib.py, graph_lib.py, losses.py, sampling.py) written with
alpha(t) = exp(-sigma_bar(t)) so that every quantity stays finite for
sigma_bar -> 0 and, for the absorbing graph, sigma_bar -> inf.

The bound. The model is: x_1 ~ p_base, the learned reverse chain from t = 1
down to t_min, then the Tweedie denoiser p_dec(x_0 | x_{t_min}) (SEDD eq. 19
with all remaining noise removed: the reference's final `denoise` step, which
for the absorbing graph drops [MASK]). For this model (Theorem 3.6 on
[t_min, 1], closed at t_min by the decoder as in VDM's reconstruction term):

  -log p(x_0) <= KL(q(x_1 | x_0) || p_base)                        prior
               + int_{t_min}^1 DWDSE_t dt                           diffusion
               + E_{q(x_{t_min} | x_0)}[-log p_dec(x_0 | x_{t_min})] reconstruction

The integral must start at t_min > 0: with t ~ U(0, 1] the integrand's second
moment diverges like int dt/t. One network call per sequence estimates all
terms without bias: with probability `recon_prob` a sequence evaluates the
reconstruction term at t_min (weight 1/recon_prob), otherwise the DWDSE
integrand at t ~ U(t_min, 1) (weight (1 - t_min)/(1 - recon_prob)); the
uniforms are stratified over the batch (`antithetic`), each still U(0, 1). The
prior is exact: p_base masks a token with probability 1 - alpha(1) and
otherwise draws it uniformly (absorbing; exactly all-[MASK] when eps = 0), or
is uniform (uniform graph); `prior()` samples this same p_base.

Schedules (`schedule`, from schedules.py): 'loglinear' (alpha(1) = `eps`) or
'geometric' (sigma_bar from `sigma_min` to `sigma_max`).

Samplers (`SamplingOptions.sampler`): 'euler' (the reference EulerPredictor =
SEDD eq. 17),
'tau_leaping' (rates frozen at t: a token jumps with probability
1 - exp(-(t - s) R_total), the chance of at least one Poisson event, to y with
probability proportional to R_y; stay probability never negative) and
'analytic' (Tweedie tau-leaping, eq. 19 / Algorithm 2, the reference
AnalyticPredictor). The last step (s = 0 on `time_grid`) is always the
Tweedie denoiser, so no [MASK] remains. The uniform graph lives in
`sedd_uniform.py`.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from diffusion_text.contract import cross_entropy
from diffusion_text.processes import base, transitions
from diffusion_text.processes.base import SamplingOptions
from diffusion_text.processes.schedules import (Schedule, check_schedule,
                                                make_schedule)

Array = jax.Array

_SCHEDULES = ("loglinear", "geometric")


def _categorical(key: Array, weights_BxLxK: Array) -> Array:
  """One draw per position from unnormalised weights: one uniform each
  (inverse CDF) rather than K Gumbels."""
  cdf_BxLxK = jnp.cumsum(weights_BxLxK, axis=-1)
  total_BxL = cdf_BxLxK[..., -1]
  u_BxL = jax.random.uniform(key, total_BxL.shape) * total_BxL
  # Strictly below the total, so trailing zero-weight states are never drawn.
  u_BxL = jnp.minimum(u_BxL, jnp.nextafter(total_BxL, 0.0))
  return jnp.sum(cdf_BxLxK <= u_BxL[..., None], axis=-1).astype(jnp.int32)


def _expand(t: Array, ndim: int) -> Array:
  """[B] or scalar -> broadcastable against an array of rank `ndim`."""
  t = jnp.asarray(t, jnp.float32)
  return t.reshape(t.shape + (1,) * (ndim - t.ndim))


@dataclasses.dataclass(frozen=True)
class _SEDD(base.Process):
  """Noise, bound estimator and sampler plumbing shared by both graphs.

  Each graph defines: `transition` (transitions.py: the absorbing or uniform
  family of exp(sigma_bar Q), which fixes K, [MASK] and the marginals);
  rate_matrix() Q [K, K] (row x: rates x -> y); prior; score_from_raw (the
  post-processed network output; `log_score` applies it to `predict`); dwdse
  (sigma(t) times the score entropy, per position); decoder_log_probs
  (log p_dec(x0 | x_t), Tweedie to noise 0); prior_kl_per_token;
  reverse_probs (unnormalised p(x_s | x_t)).
  """

  schedule: str = "loglinear"     # 'loglinear' or 'geometric' (schedules.py)
  sigma_min: float = 1e-4         # geometric: sigma_bar(0)
  sigma_max: float = 20.0         # geometric: sigma_bar(1)
  eps: float = 1e-3               # loglinear: alpha(1) = eps
  num_steps: int = 128            # default number of sampler steps
  t_min: float = 1e-3             # bound integral and sampler stop at t_min
  recon_prob: float = 1.0 / 32    # share of sequences scoring the decoder
  antithetic: bool = True         # stratified times over the batch (MD4)
  # What the network reads as time: 't', or 'total_noise' = sigma_bar(t)
  # (SEDD's published DiT; the imported backbone asks for it).
  time_input: str = "t"

  def __post_init__(self):
    check_schedule(self.schedule, _SCHEDULES, "sedd")
    if not 0.0 < self.t_min < 1.0:
      raise ValueError(f"t_min={self.t_min} must lie in (0, 1)")
    if not 0.0 < self.recon_prob < 1.0:
      raise ValueError(f"recon_prob={self.recon_prob} must lie in (0, 1)")
    if not 0.0 <= self.eps < 1.0:
      raise ValueError(f"eps={self.eps} must lie in [0, 1)")
    if self.time_input not in ("t", "total_noise"):
      raise ValueError(f"time_input={self.time_input!r} must be 't' or "
                       "'total_noise'")

  SAMPLERS = ("euler", "tau_leaping", "analytic")

  # ---- noise -------------------------------------------------------------
  @property
  def noise_schedule(self) -> Schedule:
    return make_schedule(self.schedule, eps=self.eps,
                         sigma_min=self.sigma_min, sigma_max=self.sigma_max)

  def total_noise(self, t) -> Array:
    """sigma_bar(t) (reference `noise.total_noise`)."""
    return self.noise_schedule.total(t)

  def rate_noise(self, t) -> Array:
    """sigma(t) = d sigma_bar / dt (reference `noise.rate_noise`)."""
    return self.noise_schedule.rate(t)

  def alpha(self, t) -> Array:
    """exp(-sigma_bar(t)): the chance a token has not jumped by time t."""
    return self.noise_schedule.alpha(t)

  @property
  def num_states(self) -> int:
    return self.transition.num_states

  def transp_transition(self, x: Array, beta) -> Array:
    """P(x_t = x | x_s = y) over y [..., K], beta = alpha_t / alpha_s
    (reference `transp_transition`): column x of Q(beta)."""
    return self.transition.column(x, _expand(beta, x.ndim))

  def marginal_probs(self, x0: Array, t) -> Array:
    """q(x_t | x0) [..., K], t scalar or [B]: row x0 of Q(alpha(t))."""
    return self.transition.marginal(x0, _expand(self.alpha(t), x0.ndim))

  def corrupt(self, key: Array, x0: Array, t: Array) -> Array:
    a = _expand(self.alpha(t), x0.ndim)
    return self.transition.sample(key, x0, a).astype(jnp.int32)

  def network_time(self, t_B: Array) -> Array:
    """The time input `predict` receives for process time t (`time_input`)."""
    return self.total_noise(t_B) if self.time_input == "total_noise" else t_B

  @property
  def model_spec(self) -> base.ModelSpec:
    return base.ModelSpec(input="tokens", output="logits",
                          output_dim=self.num_states,
                          input_vocab=self.num_states,
                          time_input=self.time_input)

  # ---- exact math ----------------------------------------------------------
  def forward_rates(self, x: Array) -> Array:
    """Row x of Q: rates x -> y [..., K] (reference `rate`); sums to 0."""
    return self.rate_matrix()[x]

  def transp_rate(self, x: Array) -> Array:
    """Column x of Q: rates y -> x [..., K] (reference `transp_rate`)."""
    return self.rate_matrix().T[x]

  def posterior_probs(self, x_t: Array, x0: Array, s, t) -> Array:
    """q(x_s | x_t, x_0) [..., K] for s < t, by Bayes' rule."""
    beta = self.alpha(t) / self.alpha(s)
    joint = self.marginal_probs(x0, s) * self.transp_transition(x_t, beta)
    return joint / jnp.sum(joint, axis=-1, keepdims=True)

  # ---- training ------------------------------------------------------------
  def _times(self, key: Array, batch: int) -> tuple[Array, Array]:
    """t [B] and whether each sequence scores the decoder at t_min."""
    if self.antithetic:  # each u_i is still U(0, 1): unbiased per sequence
      offset = jax.random.uniform(key, ())
      u_B = jnp.mod(offset + jnp.arange(batch) / batch, 1.0)
    else:
      u_B = jax.random.uniform(key, (batch,))
    recon_B = u_B < self.recon_prob
    v_B = (u_B - self.recon_prob) / (1.0 - self.recon_prob)
    t_B = jnp.where(recon_B, self.t_min, self.t_min + (1.0 - self.t_min) * v_B)
    return t_B, recon_B

  def sample_time(self, key: Array, batch: int) -> Array:
    return self._times(key, batch)[0]

  def nll_bound(self, key: Array, denoiser: base.Denoiser, tokens: Array,
                mask: Array) -> base.Bound:
    time_key, noise_key = jax.random.split(key)
    t_B, recon_B = self._times(time_key, tokens.shape[0])
    x_t = self.corrupt(noise_key, tokens, t_B)
    real = mask.astype(bool)
    weight = (1.0 - self.t_min) / (1.0 - self.recon_prob)
    real_BxL = real.astype(jnp.float32)
    weights = (jnp.where(recon_B, 0.0, weight)[:, None] * real_BxL,
               jnp.where(recon_B, -1.0 / self.recon_prob, 0.0)[:, None]
               * real_BxL)
    dwdse_BxL, log_dec_BxL = self._position_terms(denoiser, x_t, tokens, t_B,
                                                  weights)
    dwdse_B = base.masked_sum(dwdse_BxL, real)
    nll_dec_B = -base.masked_sum(log_dec_BxL, real)
    n_B = jnp.sum(real, axis=-1).astype(jnp.float32)
    return base.make_bound({
        "diffusion": jnp.where(recon_B, 0.0, weight * dwdse_B),
        "reconstruction": jnp.where(recon_B, nll_dec_B / self.recon_prob, 0.0),
        "prior": n_B * self.prior_kl_per_token(),
    })

  def _position_terms(self, denoiser: base.Denoiser, x_t: Array, x0: Array,
                      t_B: Array, weights) -> tuple[Array, Array]:
    """(dwdse, log p_dec(x0 | x_t)) per position [B, L] from the network's
    raw output a chunk of positions at a time (base.map_logits): both are
    O(K) sums per position, and no [B, L, K] score is ever held. `weights`:
    the two's weights in the loss, up to one factor (a speed hint)."""
    def terms(raw_NxK, rows):
      x_t_N, x0_N, t_N = rows
      score_NxK = self.score_from_raw(raw_NxK, x_t_N, t_N)
      return (self.dwdse(score_NxK, x_t_N, x0_N, t_N),
              self.decoder_log_probs(score_NxK, x_t_N, x0_N, t_N))

    t_BxL = jnp.broadcast_to(t_B[:, None], x_t.shape)
    return base.map_logits(denoiser, x_t, self.network_time(t_B), terms,
                           (x_t, x0, t_BxL), weights=weights)

  def log_score(self, denoiser: base.Denoiser, x_t: Array,
                t_B: Array) -> Array:
    """The post-processed network output [B, L, .] (see `score_from_raw`)."""
    raw = denoiser.predict(x_t, self.network_time(t_B))
    return self.score_from_raw(raw, x_t, _expand(t_B, x_t.ndim))

  def loss(self, key: Array, denoiser: base.Denoiser, tokens: Array,
           mask: Array) -> base.LossOutput:
    return base.bound_as_loss(self.nll_bound(key, denoiser, tokens, mask), mask)

  # ---- sampling ------------------------------------------------------------
  def time_grid(self, steps: int, length: int,
                options: SamplingOptions = SamplingOptions()) -> Array:
    """steps - 1 reverse-chain steps from 1 to t_min, then the denoiser to 0
    (the reference's grid plus its `denoise=True` step)."""
    del length, options
    return jnp.concatenate([jnp.linspace(1.0, self.t_min, steps),
                            jnp.zeros((1,))]).astype(jnp.float32)

  def reverse_step(self, key: Array, denoiser: base.Denoiser, x_t: Array,
                   t: Array, s: Array,
                   options: SamplingOptions = SamplingOptions()) -> Array:
    probs_BxLxK = self.reverse_probs(denoiser, x_t, t, s, options)
    return _categorical(key, probs_BxLxK)

  def decode(self, denoiser: base.Denoiser, x0: Array,
             options: SamplingOptions = SamplingOptions()) -> Array:
    del denoiser, options
    return x0


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

  def reverse_probs(self, denoiser: base.Denoiser, x_t: Array, t: Array,
                    s: Array, options: SamplingOptions = SamplingOptions()
                    ) -> Array:
    """Unnormalised p(x_s | x_t) [B, L, V+1] of the chosen sampler.

    At [MASK] every sampler unmasks to y with c * s_hat_y and stays with the
    rest (`_ABSORB_STEPS`); the denoiser (s <= 0) c = 1 and never stays
    (reference `Denoiser`).
    """
    step_fn = _ABSORB_STEPS[self.sampler(options)]
    t_B = jnp.full((x_t.shape[0],), t, jnp.float32)
    s_hat_BxLxV = jnp.exp(self.log_score(denoiser, x_t, t_B))
    total_BxL = jnp.sum(s_hat_BxLxV, axis=-1)
    c, stay_BxL = step_fn(self.noise_schedule, t, s, total_BxL)
    final = s <= 0.0
    c = jnp.where(final, 1.0, c)
    stay_BxL = jnp.where(final, 0.0, stay_BxL)
    probs_BxLxK = jnp.concatenate(
        [jnp.asarray(c)[..., None] * s_hat_BxLxV, stay_BxL[..., None]], -1)
    keep_BxLxK = jax.nn.one_hot(x_t, self.num_states)
    return jnp.where((x_t == self.mask_id)[..., None], probs_BxLxK, keep_BxLxK)


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
