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

Samplers (`sampler`): 'euler' (the reference EulerPredictor = SEDD eq. 17),
'tau_leaping' (rates frozen at t: a token jumps with probability
1 - exp(-(t - s) R_total), the chance of at least one Poisson event, to y with
probability proportional to R_y; stay probability never negative) and
'analytic' (Tweedie tau-leaping, eq. 19 / Algorithm 2, the reference
AnalyticPredictor). The last step (s = 0 on `time_grid`) is always the
Tweedie denoiser, so no [MASK] remains.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from diffusion_text.processes import base
from diffusion_text.processes.schedules import Schedule

Array = jax.Array

_NOISES = ("loglinear", "geometric")
_SAMPLERS = ("euler", "tau_leaping", "analytic")
# Floor on the uniform graph's staggered score: exp(-sigma Q) has negative
# entries, so an imperfect score can give negative Tweedie probabilities. The
# same floored distribution is sampled and scored, so the bound stays valid.
_STAG_FLOOR = 1e-20


def _f32(t) -> Array:
  return jnp.asarray(t, jnp.float32)


@dataclasses.dataclass(frozen=True)
class LogLinearNoise(Schedule):
  """sigma_bar(t) = -log(1 - (1 - eps) t), alpha = 1 - (1 - eps) t (SEDD
  noise_lib.LogLinearNoise; the MDLM linear schedule when eps = 0)."""

  eps: float = 1e-3

  def total(self, t):
    return -jnp.log1p(-(1.0 - self.eps) * _f32(t))

  def rate(self, t):
    return (1.0 - self.eps) / self.alpha(t)

  def alpha(self, t):
    return 1.0 - (1.0 - self.eps) * _f32(t)

  def one_minus_alpha(self, t):
    return (1.0 - self.eps) * _f32(t)

  def dalpha(self, t):
    return -(1.0 - self.eps) * jnp.ones_like(_f32(t))

  def alpha_end(self) -> float:
    return self.eps


@dataclasses.dataclass(frozen=True)
class GeometricNoise(Schedule):
  """sigma_bar(t) = sigma_min^(1-t) sigma_max^t (SEDD noise_lib.GeometricNoise).
  sigma_bar(0) = sigma_min > 0: the reconstruction term covers it."""

  sigma_min: float = 1e-4
  sigma_max: float = 20.0

  def total(self, t):
    t = _f32(t)
    return self.sigma_min ** (1.0 - t) * self.sigma_max ** t

  def rate(self, t):
    return self.total(t) * math.log(self.sigma_max / self.sigma_min)

  def alpha(self, t):
    return jnp.exp(-self.total(t))

  def one_minus_alpha(self, t):
    return -jnp.expm1(-self.total(t))

  def dalpha(self, t):
    return -self.rate(t) * self.alpha(t)

  def alpha_end(self) -> float:
    return math.exp(-self.sigma_max)


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
  t = _f32(t)
  return t.reshape(t.shape + (1,) * (ndim - t.ndim))


@dataclasses.dataclass(frozen=True)
class _SEDD(base.Process):
  """Noise, bound estimator and sampler plumbing shared by both graphs.

  Each graph defines: num_states K; rate_matrix() Q [K, K] (row x: rates
  x -> y); transp_transition(x, beta) = P(x_t = x | x_s = y) over y with
  beta = alpha_t / alpha_s (reference `transp_transition`); marginal_probs
  (x0, t) = q(x_t | x0) [..., K] with t scalar or [B]; corrupt; prior;
  log_score (post-processed network output); dwdse (sigma(t) times the score
  entropy, per position); decoder_log_probs (log p_dec(x0 | x_t), Tweedie to
  noise 0); prior_kl_per_token; reverse_probs (unnormalised p(x_s | x_t)).
  """

  noise: str = "loglinear"        # 'loglinear' or 'geometric'
  sigma_min: float = 1e-4         # geometric: sigma_bar(0)
  sigma_max: float = 20.0         # geometric: sigma_bar(1)
  eps: float = 1e-3               # loglinear: alpha(1) = eps
  sampler: str = "euler"          # 'euler', 'tau_leaping' or 'analytic'
  num_steps: int = 128            # default number of sampler steps
  t_min: float = 1e-3             # bound integral and sampler stop at t_min
  recon_prob: float = 1.0 / 32    # share of sequences scoring the decoder
  antithetic: bool = True         # stratified times over the batch (MD4)

  def __post_init__(self):
    if self.noise not in _NOISES:
      raise ValueError(f"noise={self.noise!r}; choose one of {_NOISES}")
    if self.sampler not in _SAMPLERS:
      raise ValueError(f"sampler={self.sampler!r}; choose one of {_SAMPLERS}")
    if not 0.0 < self.t_min < 1.0:
      raise ValueError(f"t_min={self.t_min} must lie in (0, 1)")
    if not 0.0 < self.recon_prob < 1.0:
      raise ValueError(f"recon_prob={self.recon_prob} must lie in (0, 1)")
    if not 0.0 <= self.eps < 1.0:
      raise ValueError(f"eps={self.eps} must lie in [0, 1)")

  # ---- noise -------------------------------------------------------------
  @property
  def schedule(self) -> Schedule:
    if self.noise == "loglinear":
      return LogLinearNoise(self.eps)
    return GeometricNoise(self.sigma_min, self.sigma_max)

  def total_noise(self, t) -> Array:
    """sigma_bar(t) (reference `noise.total_noise`)."""
    return self.schedule.total(t)

  def rate_noise(self, t) -> Array:
    """sigma(t) = d sigma_bar / dt (reference `noise.rate_noise`)."""
    return self.schedule.rate(t)

  def alpha(self, t) -> Array:
    """exp(-sigma_bar(t)): the chance a token has not jumped by time t."""
    return self.schedule.alpha(t)

  @property
  def model_spec(self) -> base.ModelSpec:
    return base.ModelSpec(input="tokens", output="logits",
                          output_dim=self.num_states,
                          input_vocab=self.num_states)

  # ---- exact math ----------------------------------------------------------
  def forward_rates(self, x: Array) -> Array:
    """Row x of Q: rates x -> y [..., K] (reference `rate`); sums to 0."""
    return self.rate_matrix()[x]

  def transp_rate(self, x: Array) -> Array:
    """Column x of Q: rates y -> x [..., K] (reference `transp_rate`)."""
    return self.rate_matrix().T[x]

  def posterior_probs(self, x_t: Array, x0: Array, s, t) -> Array:
    """q(x_s | x_t, x_0) [..., K] for s < t, by Bayes' rule."""
    a_s = _expand(self.alpha(s), x0.ndim + 1)
    a_t = _expand(self.alpha(t), x0.ndim + 1)
    joint = self.marginal_probs(x0, s) * self.transp_transition(x_t, a_t / a_s)
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
    score = self.log_score(denoiser, x_t, t_B)
    real = mask.astype(bool)
    dwdse_B = base.masked_sum(self.dwdse(score, x_t, tokens, t_B), real)
    nll_dec_B = -base.masked_sum(
        self.decoder_log_probs(score, x_t, tokens, t_B), real)
    n_B = jnp.sum(real, axis=-1).astype(jnp.float32)
    weight = (1.0 - self.t_min) / (1.0 - self.recon_prob)
    return base.make_bound({
        "diffusion": jnp.where(recon_B, 0.0, weight * dwdse_B),
        "reconstruction": jnp.where(recon_B, nll_dec_B / self.recon_prob, 0.0),
        "prior": n_B * self.prior_kl_per_token(),
    })

  def loss(self, key: Array, denoiser: base.Denoiser, tokens: Array,
           mask: Array) -> base.LossOutput:
    return base.bound_as_loss(self.nll_bound(key, denoiser, tokens, mask), mask)

  # ---- sampling ------------------------------------------------------------
  def time_grid(self, steps: int, length: int) -> Array:
    """steps - 1 reverse-chain steps from 1 to t_min, then the denoiser to 0
    (the reference's grid plus its `denoise=True` step)."""
    del length
    return jnp.concatenate([jnp.linspace(1.0, self.t_min, steps),
                            jnp.zeros((1,))]).astype(jnp.float32)

  def reverse_step(self, key: Array, denoiser: base.Denoiser, x_t: Array,
                   t: Array, s: Array) -> Array:
    probs_BxLxK = self.reverse_probs(denoiser, x_t, t, s)
    return _categorical(key, probs_BxLxK)

  def decode(self, denoiser: base.Denoiser, x0: Array) -> Array:
    del denoiser
    return x0


@dataclasses.dataclass(frozen=True)
class SEDDAbsorb(_SEDD):
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
    if self.schedule.alpha_end() == 0.0 and not self.scale_by_sigma:
      raise ValueError("eps=0 (sigma_bar(1) = inf) needs scale_by_sigma=True")

  @property
  def mask_id(self) -> int:
    return self.vocab_size

  @property
  def num_states(self) -> int:
    return self.vocab_size + 1

  def rate_matrix(self) -> Array:
    k = self.num_states
    q_KxK = jnp.zeros((k, k)).at[:, self.mask_id].set(1.0) - jnp.eye(k)
    return q_KxK.at[self.mask_id].set(0.0)

  def transp_transition(self, x: Array, beta) -> Array:
    beta = _expand(beta, x.ndim + 1)
    onehot = jax.nn.one_hot(x, self.num_states)
    return beta * onehot + (1.0 - beta) * (x == self.mask_id)[..., None]

  def marginal_probs(self, x0: Array, t) -> Array:
    a = _expand(self.alpha(t), x0.ndim + 1)
    k = self.num_states
    return a * jax.nn.one_hot(x0, k) + (1.0 - a) * jax.nn.one_hot(
        jnp.full_like(x0, self.mask_id), k)

  def corrupt(self, key: Array, x0: Array, t: Array) -> Array:
    a = _expand(self.alpha(t), x0.ndim)
    masked = jax.random.uniform(key, x0.shape) >= a
    return jnp.where(masked, self.mask_id, x0).astype(jnp.int32)

  def log_score(self, denoiser: base.Denoiser, x_t: Array,
                t_B: Array) -> Array:
    """log s_hat [B, L, V] from the network's raw output [B, L, V+1]."""
    raw_BxLxV = denoiser.predict(x_t, t_B)[..., :self.vocab_size]
    raw_BxLxV = raw_BxLxV.astype(jnp.float32)
    if self.scale_by_sigma:
      return raw_BxLxV - math.log(self.vocab_size)
    s = self.schedule
    odds_B = jnp.log(s.one_minus_alpha(t_B)) - jnp.log(s.alpha(t_B))
    return raw_BxLxV + odds_B[:, None, None]

  def dwdse(self, score: Array, x_t: Array, x0: Array, t_B: Array) -> Array:
    """sigma(t) * score entropy per position [B, L] (graph_lib.score_entropy:
    ratio (sum s_hat - log s_hat_x0 - 1) at [MASK], ratio = alpha/(1-alpha))."""
    s = self.schedule
    weight_B = -s.dalpha(t_B) / s.one_minus_alpha(t_B)   # = sigma * ratio
    lse_BxL = jax.nn.logsumexp(score, axis=-1)
    target_BxL = jnp.take_along_axis(score, x0[..., None], -1)[..., 0]
    # sum s_hat - 1 - log s_hat_x0 >= expm1(lse) - lse >= 0, stably.
    se_BxL = jnp.expm1(lse_BxL) - target_BxL
    return jnp.where(x_t == self.mask_id, weight_B[:, None] * se_BxL, 0.0)

  def decoder_log_probs(self, score: Array, x_t: Array, x0: Array,
                        t_B: Array) -> Array:
    """log p_dec(x0 | x_t) [B, L]: softmax(log s_hat) at [MASK], else exact."""
    del t_B
    lse_BxL = jax.nn.logsumexp(score, axis=-1)
    target_BxL = jnp.take_along_axis(score, x0[..., None], -1)[..., 0]
    return jnp.where(x_t == self.mask_id, target_BxL - lse_BxL, 0.0)

  def prior_kl_per_token(self) -> float:
    """KL((a delta_x0 + (1-a) delta_M) || p_base) = a log V, a = alpha(1)."""
    return self.schedule.alpha_end() * math.log(self.vocab_size)

  def prior(self, key: Array, shape: tuple[int, int]) -> Array:
    a = self.schedule.alpha_end()
    all_mask = jnp.full(shape, self.mask_id, jnp.int32)
    if a == 0.0:
      return all_mask
    keep_key, token_key = jax.random.split(key)
    keep = jax.random.uniform(keep_key, shape) < a
    tokens = jax.random.randint(token_key, shape, 0, self.vocab_size)
    return jnp.where(keep, tokens, all_mask)

  def reverse_probs(self, denoiser: base.Denoiser, x_t: Array, t: Array,
                    s: Array) -> Array:
    """Unnormalised p(x_s | x_t) [B, L, V+1] of the configured sampler.

    At [MASK] every sampler unmasks to y with c * s_hat_y and stays with the
    rest: euler c = (t-s) sigma ratio (eq. 17), analytic c = (alpha_s -
    alpha_t)/(1 - alpha_t) (eq. 19), tau_leaping c = P(jump)/sum s_hat; the
    denoiser (s <= 0) c = 1 and never stays (reference `Denoiser`).
    """
    sch = self.schedule
    t_B = jnp.full((x_t.shape[0],), t, jnp.float32)
    s_hat_BxLxV = jnp.exp(self.log_score(denoiser, x_t, t_B))
    total_BxL = jnp.sum(s_hat_BxLxV, axis=-1)
    one_minus_a_t = sch.one_minus_alpha(t)
    if self.sampler == "analytic":
      c = (sch.alpha(s) - sch.alpha(t)) / one_minus_a_t
      stay_BxL = jnp.maximum(1.0 - c * total_BxL, 0.0)
    else:
      rate = (t - s) * -sch.dalpha(t) / one_minus_a_t
      if self.sampler == "euler":
        c = rate
        stay_BxL = jnp.maximum(1.0 - c * total_BxL, 0.0)
      else:
        jump_BxL = -jnp.expm1(-rate * total_BxL)
        c = jump_BxL / total_BxL
        stay_BxL = 1.0 - jump_BxL
    final = s <= 0.0
    c = jnp.where(final, 1.0, c)
    stay_BxL = jnp.where(final, 0.0, stay_BxL)
    probs_BxLxK = jnp.concatenate(
        [jnp.asarray(c)[..., None] * s_hat_BxLxV, stay_BxL[..., None]], -1)
    keep_BxLxK = jax.nn.one_hot(x_t, self.num_states)
    return jnp.where((x_t == self.mask_id)[..., None], probs_BxLxK, keep_BxLxK)


@dataclasses.dataclass(frozen=True)
class SEDDUniform(_SEDD):
  """SEDD with Q_uniform = 11^T/K - I over the K = V data tokens.

  The score is log s [B, L, K], log s_y = log p_t(y)/p_t(x_t), with the
  current token's entry set to 0 (the reference model's final scatter).
  """

  def __post_init__(self):
    super().__post_init__()
    if self.schedule.alpha_end() == 0.0:
      raise ValueError("the uniform graph needs alpha(1) > 0 (eps > 0)")

  @property
  def num_states(self) -> int:
    return self.vocab_size

  def rate_matrix(self) -> Array:
    k = self.num_states
    return jnp.full((k, k), 1.0 / k) - jnp.eye(k)

  def transp_transition(self, x: Array, beta) -> Array:
    beta = _expand(beta, x.ndim + 1)
    return beta * jax.nn.one_hot(x, self.num_states) + (1.0 - beta) / self.num_states

  def marginal_probs(self, x0: Array, t) -> Array:
    return self.transp_transition(x0, self.alpha(t))

  def corrupt(self, key: Array, x0: Array, t: Array) -> Array:
    move_key, token_key = jax.random.split(key)
    a = _expand(self.alpha(t), x0.ndim)
    move = jax.random.uniform(move_key, x0.shape) >= a
    tokens = jax.random.randint(token_key, x0.shape, 0, self.num_states)
    return jnp.where(move, tokens, x0).astype(jnp.int32)

  def log_score(self, denoiser: base.Denoiser, x_t: Array,
                t_B: Array) -> Array:
    raw_BxLxK = denoiser.predict(x_t, t_B).astype(jnp.float32)
    current_BxLxK = jax.nn.one_hot(x_t, self.num_states, dtype=bool)
    return jnp.where(current_BxLxK, 0.0, raw_BxLxK)

  def dwdse(self, score: Array, x_t: Array, x0: Array, t_B: Array) -> Array:
    """sigma(t) * score entropy per position [B, L] (graph_lib.score_entropy).

    (1/K) sum_{y != x} r_y h(log s_y - log r_y), h(d) = e^d - 1 - d >= 0,
    with the true ratios r_y = rho (x = x0, rho = (1-a)/(1-a+Ka)), 1/rho
    (y = x0 != x) or 1: the reference's pos - neg + const, term by term.
    """
    k = self.num_states
    sch = self.schedule
    a_B, om_B = sch.alpha(t_B), sch.one_minus_alpha(t_B)
    log_rho_B = jnp.log(om_B) - jnp.log(om_B + k * a_B)
    y_K = jnp.arange(k)
    at_x0_BxLxK = y_K == x0[..., None]
    clean_BxLx1 = (x_t == x0)[..., None]
    log_rho = log_rho_B[:, None, None]
    log_r_BxLxK = jnp.where(clean_BxLx1, log_rho,
                            jnp.where(at_x0_BxLxK, -log_rho, 0.0))
    d_BxLxK = score - log_r_BxLxK
    term_BxLxK = jnp.exp(log_r_BxLxK) * (jnp.expm1(d_BxLxK) - d_BxLxK)
    term_BxLxK = jnp.where(y_K == x_t[..., None], 0.0, term_BxLxK)
    return sch.rate(t_B)[:, None] * jnp.sum(term_BxLxK, axis=-1) / k

  def _tweedie(self, score: Array, x_t: Array, beta) -> Array:
    """Unnormalised Tweedie p(x_s | x_t) [B, L, K], beta = alpha_t/alpha_s:
    (exp(-dsigma Q) s)_y * exp(dsigma Q)(x_t, y) (reference staggered_score *
    transp_transition), times beta so nothing is divided by it."""
    k = self.num_states
    beta = _expand(beta, x_t.ndim + 1)
    s_BxLxK = jnp.exp(score)
    mean_BxLx1 = jnp.sum(s_BxLxK, axis=-1, keepdims=True) / k
    stag_BxLxK = jnp.maximum(s_BxLxK - (1.0 - beta) * mean_BxLx1,
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
    k, a = self.num_states, self.schedule.alpha_end()
    q0 = a + (1.0 - a) / k
    return q0 * math.log(k * q0) + (1.0 - q0) * math.log1p(-a)

  def prior(self, key: Array, shape: tuple[int, int]) -> Array:
    return jax.random.randint(key, shape, 0, self.num_states, jnp.int32)

  def reverse_probs(self, denoiser: base.Denoiser, x_t: Array, t: Array,
                    s: Array) -> Array:
    """Unnormalised p(x_s | x_t) [B, L, K] of the configured sampler; the
    Tweedie denoiser to noise 0 when s <= 0.

    euler: (t-s) sigma s_y / K off the current token (eq. 17); tau_leaping:
    P(jump) = 1 - exp(-(t-s) R), R = sigma sum_{y != x} s_y / K, split in
    proportion to s_y; analytic: Tweedie from alpha_t to alpha_s (eq. 19).
    """
    sch = self.schedule
    k = self.num_states
    t_B = jnp.full((x_t.shape[0],), t, jnp.float32)
    score = self.log_score(denoiser, x_t, t_B)
    a_t = sch.alpha(t)
    final = s <= 0.0
    if self.sampler == "analytic":
      beta = jnp.where(final, a_t, a_t / sch.alpha(s))
      return self._tweedie(score, x_t, beta)

    current_BxLxK = jax.nn.one_hot(x_t, k, dtype=bool)

    def chain_step(score):
      s_BxLxK = jnp.where(current_BxLxK, 0.0, jnp.exp(score))
      out_BxL = jnp.sum(s_BxLxK, axis=-1)
      step = (t - s) * sch.rate(t) / k
      if self.sampler == "euler":
        move_BxLxK = step * s_BxLxK
        stay_BxL = jnp.maximum(1.0 - step * out_BxL, 0.0)
      else:
        x_BxL = step * out_BxL
        # (1 - e^-x) / x, -> 1 as x -> 0.
        safe_BxL = jnp.maximum(x_BxL, 1e-6)
        phi_BxL = jnp.where(x_BxL > 1e-6, -jnp.expm1(-safe_BxL) / safe_BxL,
                            1.0 - 0.5 * x_BxL)
        move_BxLxK = (step * phi_BxL)[..., None] * s_BxLxK
        stay_BxL = 1.0 - x_BxL * phi_BxL
      return jnp.where(current_BxLxK, stay_BxL[..., None], move_BxLxK)

    return jax.lax.cond(final, lambda sc: self._tweedie(sc, x_t, a_t),
                        chain_step, score)
