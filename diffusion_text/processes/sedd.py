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
Tweedie denoiser, so no [MASK] remains. The graphs live in `sedd_absorb.py`
(`sedd_absorb`) and `sedd_uniform.py` (`sedd_uniform`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from diffusion_text import contract
from diffusion_text.processes import base, draws
from diffusion_text.processes.base import SamplingOptions
from diffusion_text.processes.schedules import (Schedule, check_schedule,
                                                make_schedule)

Array = jax.Array

_SCHEDULES = ("loglinear", "geometric")


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
    O(K) sums per position, and no [B, L, K] score is ever held.

    `weights`: the two's weights in the loss, up to one factor. A term is
    reported only where its weight is nonzero (0 elsewhere), and the
    decoder's V-wide passes run only in chunks where some position uses it:
    each sequence scores either the DWDSE or (with probability `recon_prob`)
    the decoder, so most chunks skip them (`_sparse_terms`).
    """
    def terms(raw_NxK, rows):
      return _sparse_terms(self, raw_NxK, *rows)

    t_BxL = jnp.broadcast_to(t_B[:, None], x_t.shape)
    need_dw, need_dec = (jnp.broadcast_to(w, x_t.shape) != 0 for w in weights)
    return base.map_logits(denoiser, x_t, self.network_time(t_B), terms,
                           (x_t, x0, t_BxL, need_dw, need_dec),
                           weights=weights, chunk=contract.LIGHT_ROW_CHUNK)

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
    # Stay with the current state's share, else draw among the others:
    # only the few positions that move per step pay for a K-way draw.
    return draws.stay_or_move(key, probs_BxLxK, x_t, options.float64)

  def decode(self, denoiser: base.Denoiser, x0: Array,
             options: SamplingOptions = SamplingOptions()) -> Array:
    del denoiser, options
    return x0


def _dwdse_and_decoder(process: _SEDD, raw_NxK: Array, x_t: Array,
                       x0: Array, t: Array, need_dw: Array, need_dec: Array):
  """(dwdse, log p_dec) rows, 0 where not needed; the decoder's V-wide
  work only if some row needs it (`lax.cond`)."""
  score_NxK = process.score_from_raw(raw_NxK, x_t, t)
  dw = jnp.where(need_dw, process.dwdse(score_NxK, x_t, x0, t), 0.0)
  dec = jax.lax.cond(
      jnp.any(need_dec),
      lambda: process.decoder_log_probs(score_NxK, x_t, x0, t),
      lambda: jnp.zeros(need_dec.shape, jnp.float32))
  return dw, jnp.where(need_dec, dec, 0.0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _sparse_terms(process, raw_NxK, x_t, x0, t, need_dw, need_dec):
  return _dwdse_and_decoder(process, raw_NxK, x_t, x0, t, need_dw, need_dec)


def _sparse_terms_fwd(process, raw_NxK, x_t, x0, t, need_dw, need_dec):
  out = _dwdse_and_decoder(process, raw_NxK, x_t, x0, t, need_dw, need_dec)
  return out, (raw_NxK, x_t, x0, t, need_dw, need_dec)


def _sparse_terms_bwd(process, res, g):
  """Autodiff of each term, the decoder's only where a row needs it. (A
  `lax.cond` differentiated by jax carries its [N, K] residuals out of the
  forward branch; here the backward recomputes from the raw output.)"""
  raw_NxK, x_t, x0, t, need_dw, need_dec = res
  g_dw, g_dec = (jnp.where(need, g, 0.0)
                 for need, g in ((need_dw, g[0]), (need_dec, g[1])))

  def grad(term, cotangent):
    fn = lambda raw: term(process.score_from_raw(raw, x_t, t), x_t, x0, t)
    return jax.vjp(fn, raw_NxK)[1](cotangent)[0]

  d_raw = grad(process.dwdse, g_dw)
  d_raw = jax.lax.cond(jnp.any(need_dec),
                       lambda d: d + grad(process.decoder_log_probs, g_dec),
                       lambda d: d, d_raw)
  return d_raw, None, None, None, None, None  # None: no cotangent


_sparse_terms.defvjp(_sparse_terms_fwd, _sparse_terms_bwd)
