"""Gaussian diffusion on learned token embeddings, discrete time (T steps).

DDPM (Ho et al. 2020) run on the latent chain of Diffusion-LM (Li et al.
2022): a token sequence w is embedded deterministically, x_0 = E[w], and
noised by the variance-preserving chain
  q(x_t | x_0) = N(sqrt(ab_t) x_0, (1 - ab_t) I)            (Ho eq. 4)
with ab_i = schedule.alpha(i / T), beta_i = 1 - ab_i / ab_{i-1}.

Training objective (`loss`), per real token:
  L_simple = ||eps - eps_hat(x_t, t)||^2 / D at a uniform step    (Ho eq. 14)
  + rounding_weight * -log p(w | x_1)                 (Diffusion-LM eq. 2)
  + prior_weight * KL(q(x_T | x_0) || N(0, I)).
The eps-MSE alone is minimised by shrinking the embeddings to zero (the
collapse of Diffusion-LM sec. 4.1); the rounding term at x_1, whose noise
level sqrt(1 - ab_1) is fixed in absolute terms, keeps the tokens apart, and
the prior term keeps the norm from growing past what the chain can erase.

Bound (`nll_bound`): the full discrete-time VLB of the latent chain (Ho
eq. 5). Because x_0 = E[w] is deterministic, q(x_{1:T} | w) is a proper
distribution and
  -log p(w) <= KL(q(x_T|x_0) || N(0,I))
               + sum_{t=2..T} KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t))
               + E_q[-log p(w | x_1)],
with p(w | x_1) = softmax(round_logits(x0_hat(x_1))). The sum is estimated
by one uniform t in {2..T} times (T - 1). The reverse kernel is
p(x_s | x_t) = N(mu~(x_t, x0_hat), sigma^2 I) with mu~ the posterior mean
(Ho eq. 7) and sigma^2 = beta~ (posterior variance, default; then the KL is
exactly 0.5 (SNR_s / SNR_t - 1) ||eps - eps_hat||^2, Ho eq. 12) or beta
(`reverse_variance='beta'`, whose variance mismatch constants are kept).
Padded positions are left out of every sum; their latents carry no
information about the real tokens, so the result is still a bound.

Samplers: DDPM ancestral (Ho Algorithm 2, for any s < t) and DDIM (Song et
al. 2021 eq. 12), both reading alpha-bar from the continuous schedule so any
step count works; `clamp` snaps x0_hat to the nearest embedding before each
step (Diffusion-LM sec. 4.2).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from diffusion_text.processes.base import (Array, Bound, Denoiser,
                                           LossOutput, ModelSpec, Process,
                                           make_bound, masked_sum, per_token)
from diffusion_text.processes.schedules import Schedule, make_schedule

_SAMPLERS = ("ddpm", "ddim")
_REVERSE_VARIANCES = ("posterior", "beta")


def _bcast(v: Array, x: Array) -> Array:
  """A scalar or per-example [B] value shaped to broadcast against x [B, ...]."""
  v = jnp.asarray(v, jnp.float32)
  return v.reshape(v.shape + (1,) * (x.ndim - v.ndim))


def _cross_entropy(logits_BxLxV: Array, tokens_BxL: Array) -> Array:
  """-log softmax(logits)[token] as logsumexp minus the target logit."""
  logits_BxLxV = logits_BxLxV.astype(jnp.float32)
  target_BxL = jnp.take_along_axis(
      logits_BxLxV, tokens_BxL[..., None], axis=-1)[..., 0]
  return jax.nn.logsumexp(logits_BxLxV, axis=-1) - target_BxL


@dataclasses.dataclass(frozen=True)
class GaussianProcess(Process):
  """DDPM on Diffusion-LM embeddings with eps-prediction (see module doc)."""

  num_steps: int = 1000  # T; step i sits at t_i = i / T.
  schedule: str = "cosine_vp"  # alpha-bar(t): 'cosine_vp' or 'linear_beta'.
  latent_dim: int = 64  # D, the embedding width.
  rounding_weight: float = 1.0  # weight of -log p(w | x_1) in the loss.
  prior_weight: float = 1.0  # weight of KL(q(x_T | x_0) || N(0, I)) in the loss.
  sampler: str = "ddpm"  # 'ddpm' (ancestral) or 'ddim'.
  ddim_eta: float = 0.0  # DDIM stochasticity; 1.0 matches DDPM's beta~.
  clamp: bool = False  # snap x0_hat to the nearest embedding while sampling.
  reverse_variance: str = "posterior"  # sigma_t^2: 'posterior' beta~ or 'beta'.

  def __post_init__(self):
    if self.num_steps < 1:
      raise ValueError(f"num_steps must be >= 1, got {self.num_steps}")
    if self.sampler not in _SAMPLERS:
      raise ValueError(f"unknown sampler {self.sampler!r}; choose one of: "
                       f"{', '.join(_SAMPLERS)}")
    if self.reverse_variance not in _REVERSE_VARIANCES:
      raise ValueError(f"unknown reverse_variance {self.reverse_variance!r}; "
                       f"choose one of: {', '.join(_REVERSE_VARIANCES)}")
    self.noise_schedule  # Raises a clear error on an unknown schedule name.

  @property
  def noise_schedule(self) -> Schedule:
    if self.schedule == "linear_beta":
      return make_schedule(self.schedule, num_steps=self.num_steps)
    return make_schedule(self.schedule)

  @property
  def model_spec(self) -> ModelSpec:
    return ModelSpec(input="latents", latent_dim=self.latent_dim,
                     output="vector", output_dim=self.latent_dim,
                     embed_vocab=self.vocab_size)

  # ---- the exact math -----------------------------------------------------
  def alpha_bar(self, t: Array) -> Array:
    """alpha-bar at time t in [0, 1] (ab_i = alpha_bar(i / T))."""
    return self.noise_schedule.alpha(jnp.asarray(t, jnp.float32))

  def posterior_mean_variance(self, x_t: Array, x0: Array, s: Array,
                              t: Array) -> tuple[Array, Array]:
    """q(x_s | x_t, x_0) for s < t (Ho eq. 6-7 with alpha_t -> ab_t / ab_s).

    s, t: scalars or [B]. Returns the mean [B, L, D] and the variance,
    broadcastable against it.
    """
    ab_s, ab_t = _bcast(self.alpha_bar(s), x_t), _bcast(self.alpha_bar(t), x_t)
    beta_ts = 1.0 - ab_t / ab_s
    mean = (jnp.sqrt(ab_s) * beta_ts / (1.0 - ab_t) * x0
            + jnp.sqrt(ab_t / ab_s) * (1.0 - ab_s) / (1.0 - ab_t) * x_t)
    return mean, beta_ts * (1.0 - ab_s) / (1.0 - ab_t)

  def reverse_variance_at(self, s: Array, t: Array) -> Array:
    """sigma^2 of p(x_s | x_t): beta~ (posterior) or beta_{t|s}."""
    ab_s, ab_t = self.alpha_bar(s), self.alpha_bar(t)
    beta_ts = 1.0 - ab_t / ab_s
    if self.reverse_variance == "beta":
      return beta_ts
    return beta_ts * (1.0 - ab_s) / (1.0 - ab_t)

  def predict_x0(self, denoiser: Denoiser, x_t: Array,
                 t: Array) -> tuple[Array, Array]:
    """(x0_hat, eps_hat) from the eps-prediction at x_t; t scalar or [B]."""
    t_B = jnp.broadcast_to(jnp.asarray(t, jnp.float32), x_t.shape[:1])
    eps_hat = denoiser.predict(x_t, t_B).astype(jnp.float32)
    ab_t = _bcast(self.alpha_bar(t_B), x_t)
    x0_hat = (x_t - jnp.sqrt(1.0 - ab_t) * eps_hat) / jnp.sqrt(ab_t)
    return x0_hat, eps_hat

  def reverse_mean_variance(self, denoiser: Denoiser, x_t: Array, s: Array,
                            t: Array) -> tuple[Array, Array]:
    """p(x_s | x_t) = N(mu~(x_t, x0_hat), sigma^2 I) (Ho eq. 11)."""
    x0_hat, _ = self.predict_x0(denoiser, x_t, t)
    mean, _ = self.posterior_mean_variance(x_t, x0_hat, s, t)
    return mean, _bcast(self.reverse_variance_at(s, t), x_t)

  def prior_kl(self, x0: Array) -> Array:
    """KL(q(x_T | x_0) || N(0, I)) per position [B, L], summed over D."""
    ab_T = self.alpha_bar(1.0)
    dim = x0.shape[-1]
    return 0.5 * (ab_T * jnp.sum(jnp.square(x0), axis=-1)
                  - dim * (ab_T + jnp.log1p(-ab_T)))

  def _kl_from_eps(self, eps: Array, eps_hat: Array, s: Array,
                   t: Array) -> Array:
    """KL(q(x_s|x_t,x_0) || p(x_s|x_t)) per position [B, L]; s, t: [B].

    With x0_hat = x_0 + sqrt((1-ab_t)/ab_t) (eps - eps_hat) the mean gap is
    (ab_s - ab_t) / sqrt(ab_s ab_t (1 - ab_t)) (eps_hat - eps); dividing by
    sigma^2 in closed form avoids 0/0 where the schedule is flat (ab_s = ab_t).
    """
    ab_s = _bcast(self.alpha_bar(s), eps[..., 0])
    ab_t = _bcast(self.alpha_bar(t), eps[..., 0])
    sq_err = jnp.sum(jnp.square(eps - eps_hat), axis=-1)
    if self.reverse_variance == "beta":
      weight = (ab_s - ab_t) / (ab_t * (1.0 - ab_t))
      var_ratio = (1.0 - ab_s) / (1.0 - ab_t)  # beta~ / beta
      const = eps.shape[-1] * (var_ratio - 1.0 - jnp.log(var_ratio))
    else:
      weight = (ab_s - ab_t) / (ab_t * (1.0 - ab_s))  # SNR_s / SNR_t - 1
      const = 0.0
    return 0.5 * (weight * sq_err + const)

  def diffusion_kl(self, denoiser: Denoiser, x0: Array, x_t: Array, s: Array,
                   t: Array) -> Array:
    """KL(q(x_s|x_t,x_0) || p(x_s|x_t)) per position [B, L]; s, t: [B]."""
    ab_t = _bcast(self.alpha_bar(t), x_t)
    eps = (x_t - jnp.sqrt(ab_t) * x0) / jnp.sqrt(1.0 - ab_t)
    _, eps_hat = self.predict_x0(denoiser, x_t, t)
    return self._kl_from_eps(eps, eps_hat, s, t)

  # ---- training -------------------------------------------------------------
  def sample_time(self, key: Array, batch: int) -> Array:
    step_B = jax.random.randint(key, (batch,), 1, self.num_steps + 1)
    return step_B / self.num_steps

  def _noised(self, key: Array, x0: Array, t: Array) -> tuple[Array, Array]:
    eps = jax.random.normal(key, x0.shape, jnp.float32)
    ab_t = _bcast(self.alpha_bar(t), x0)
    return jnp.sqrt(ab_t) * x0 + jnp.sqrt(1.0 - ab_t) * eps, eps

  def corrupt(self, key: Array, x0: Array, t: Array) -> Array:
    """x_t ~ q(x_t | x_0) for latents x0 [B, L, D] (x0 = embed(tokens))."""
    return self._noised(key, x0, t)[0]

  def _predict_pair(self, denoiser: Denoiser, x_a: Array, t_a: Array,
                    x_1: Array) -> tuple[Array, Array]:
    """eps_hat at (x_a, t_a) and at (x_1, 1/T) in one batched network call."""
    batch = x_a.shape[0]
    t_1 = jnp.full((batch,), 1.0 / self.num_steps)
    eps_hat = denoiser.predict(jnp.concatenate([x_a, x_1]),
                               jnp.concatenate([t_a, t_1])).astype(jnp.float32)
    return eps_hat[:batch], eps_hat[batch:]

  def _reconstruction(self, denoiser: Denoiser, x_1: Array, eps_hat_1: Array,
                      tokens: Array) -> Array:
    """-log p(w | x_1) per position [B, L]."""
    ab_1 = self.alpha_bar(1.0 / self.num_steps)
    x0_hat = (x_1 - jnp.sqrt(1.0 - ab_1) * eps_hat_1) / jnp.sqrt(ab_1)
    return _cross_entropy(denoiser.round_logits(x0_hat), tokens)

  def loss(self, key: Array, denoiser: Denoiser, tokens: Array,
           mask: Array) -> LossOutput:
    time_key, noise_key, x1_key = jax.random.split(key, 3)
    T = self.num_steps
    x0 = denoiser.embed(tokens).astype(jnp.float32)
    t_B = self.sample_time(time_key, tokens.shape[0])
    x_t, eps = self._noised(noise_key, x0, t_B)
    x_1, _ = self._noised(x1_key, x0, jnp.full_like(t_B, 1.0 / T))
    eps_hat, eps_hat_1 = self._predict_pair(denoiser, x_t, t_B, x_1)

    mse_BxL = jnp.mean(jnp.square(eps - eps_hat), axis=-1)
    recon_BxL = self._reconstruction(denoiser, x_1, eps_hat_1, tokens)
    prior_BxL = self.prior_kl(x0)
    loss = per_token(masked_sum(mse_BxL + self.rounding_weight * recon_BxL
                                + self.prior_weight * prior_BxL, mask), mask)

    # The same draw also estimates the diffusion sum: T * KL_i * [i >= 2]
    # is unbiased for sum_{i=2..T} KL_i when i is uniform on {1..T}.
    step_B = jnp.round(t_B * T)
    safe_step_B = jnp.maximum(step_B, 2.0)
    kl_BxL = self._kl_from_eps(eps, eps_hat, (safe_step_B - 1.0) / T,
                               safe_step_B / T)
    diffusion_B = jnp.where(step_B >= 2, T * masked_sum(kl_BxL, mask), 0.0)
    terms = {"prior": masked_sum(prior_BxL, mask),
             "diffusion": jax.lax.stop_gradient(diffusion_B),
             "reconstruction": masked_sum(recon_BxL, mask)}
    metrics = {"loss": loss,
               "eps_mse": per_token(masked_sum(mse_BxL, mask), mask),
               "nll_bound": per_token(sum(terms.values()), mask),
               **{k: per_token(v, mask) for k, v in terms.items()}}
    return LossOutput(loss=loss, metrics=metrics, terms=terms)

  def nll_bound(self, key: Array, denoiser: Denoiser, tokens: Array,
                mask: Array) -> Bound:
    time_key, noise_key, x1_key = jax.random.split(key, 3)
    T, batch = self.num_steps, tokens.shape[0]
    x0 = denoiser.embed(tokens).astype(jnp.float32)
    x_1, _ = self._noised(x1_key, x0, jnp.full((batch,), 1.0 / T))
    terms = {"prior": masked_sum(self.prior_kl(x0), mask)}
    if T >= 2:
      step_B = jax.random.randint(time_key, (batch,), 2, T + 1)
      t_B = step_B / T
      x_t, eps = self._noised(noise_key, x0, t_B)
      eps_hat, eps_hat_1 = self._predict_pair(denoiser, x_t, t_B, x_1)
      kl_BxL = self._kl_from_eps(eps, eps_hat, (step_B - 1) / T, t_B)
      terms["diffusion"] = (T - 1) * masked_sum(kl_BxL, mask)
    else:
      _, eps_hat_1 = self.predict_x0(denoiser, x_1, 1.0 / T)
      terms["diffusion"] = jnp.zeros((batch,), jnp.float32)
    terms["reconstruction"] = masked_sum(
        self._reconstruction(denoiser, x_1, eps_hat_1, tokens), mask)
    return make_bound(terms)

  # ---- sampling -------------------------------------------------------------
  def prior(self, key: Array, shape: tuple[int, int]) -> Array:
    return jax.random.normal(key, (*shape, self.latent_dim), jnp.float32)

  def _nearest_embedding(self, denoiser: Denoiser, x: Array) -> Array:
    """The embedding closest (L2) to each x [B, L, D]."""
    table_VxD = denoiser.embed(jnp.arange(self.vocab_size)[None])[0]
    table_VxD = table_VxD.astype(jnp.float32)
    score_BxLxV = (jnp.einsum("bld,vd->blv", x, table_VxD)
                   - 0.5 * jnp.sum(jnp.square(table_VxD), axis=-1))
    return jnp.take(table_VxD, jnp.argmax(score_BxLxV, axis=-1), axis=0)

  def reverse_step(self, key: Array, denoiser: Denoiser, x_t: Array,
                   t: Array, s: Array) -> Array:
    """x_s from x_t (scalars t > s); at s == 0 the mean x0_hat, no noise."""
    x0_hat, eps_hat = self.predict_x0(denoiser, x_t, t)
    ab_t, ab_s = self.alpha_bar(t), self.alpha_bar(s)
    if self.clamp:
      x0_hat = self._nearest_embedding(denoiser, x0_hat)
      eps_hat = (x_t - jnp.sqrt(ab_t) * x0_hat) / jnp.sqrt(1.0 - ab_t)
    if self.sampler == "ddpm":
      mean, _ = self.posterior_mean_variance(x_t, x0_hat, s, t)
      var = self.reverse_variance_at(s, t)
    else:
      var = (self.ddim_eta ** 2 * (1.0 - ab_s) / (1.0 - ab_t)
             * (1.0 - ab_t / ab_s))
      mean = (jnp.sqrt(ab_s) * x0_hat
              + jnp.sqrt(jnp.maximum(1.0 - ab_s - var, 0.0)) * eps_hat)
    if self.sampler == "ddim" and self.ddim_eta == 0.0:
      x_s = mean
    else:
      x_s = mean + jnp.sqrt(var) * jax.random.normal(key, x_t.shape)
    return jnp.where(s > 0, x_s, x0_hat)

  def decode(self, denoiser: Denoiser, x0: Array) -> Array:
    return jnp.argmax(denoiser.round_logits(x0), axis=-1).astype(jnp.int32)

  def impose(self, key: Array, denoiser: Denoiser, x_t: Array, t: Array,
             tokens: Array, cond_mask: Array) -> Array:
    """Replacement conditioning: positions in cond_mask get a fresh draw of
    q(x_t | E[w]) (the clean embedding at t == 0)."""
    x0 = denoiser.embed(tokens).astype(jnp.float32)
    ab_t = _bcast(self.alpha_bar(t), x0)
    noised = jnp.sqrt(ab_t) * x0 + jnp.sqrt(1.0 - ab_t) * jax.random.normal(
        key, x0.shape)
    known = jnp.where(_bcast(t, x0) > 0, noised, x0)
    return jnp.where(cond_mask.astype(bool)[..., None], known, x_t)
