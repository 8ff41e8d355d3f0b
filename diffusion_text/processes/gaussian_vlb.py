"""Continuous-time Gaussian diffusion on learned token embeddings, exact VLB.

Kingma et al. 2021, "Variational Diffusion Models" (VDM) and Gulrajani &
Hashimoto 2023, "Likelihood-Based Diffusion Language Models" (PLAID).

Tokens w are embedded as x = e_w (rows of the learned table E, normalised, see
`embed_norm`) and diffused variance-preservingly with gamma(t) = -log SNR(t):
z_t = alpha_t x + sigma_t eps, alpha_t^2 = sigmoid(-gamma_t),
sigma_t^2 = sigmoid(gamma_t) (VDM eq. 3-4). The network predicts logits over
the vocabulary and x0-hat = softmax(logits) @ E (PLAID sec. 3.2). The bound,
per sequence, in nats (VDM eq. 11, 17 and appendix):

  prior          KL(q(z_1 | x) || N(0, I))
  diffusion      0.5 E_{t~U(0,1)} [gamma'(t) exp(-gamma_t) ||x - x0hat||^2]
                 (= -0.5 SNR'(t) ||x - x0hat||^2, eq. 17 in x-form; equal to
                 vdm.py's 0.5 gamma'(t) ||eps - eps_hat||^2); one antithetic
                 t per sequence, so single-sequence values are heavy-tailed
                 (average many sequences or time samples)
  reconstruction -log p(w | z_0), z_0 ~ q(z_0 | x), with vdm.py's exact
                 Gaussian decoder p(w | z_0) = softmax_w(-||z_0 / alpha_0 -
                 e_w||^2 exp(-gamma_0) / 2).

Choices (documented here because they change numbers):
  * `embed_norm='unit'` divides every row of E by its L2 norm (PLAID's
    EmbeddingMatrix): with a fixed gamma range the ELBO could otherwise trade
    embedding scale against SNR. 'none' uses the table as it is.
  * `base_logits=True` adds the exact Gaussian log-likelihood
    alpha_t / sigma_t^2 <z_t, e_w> - alpha_t^2 / (2 sigma_t^2) ||e_w||^2 to
    the network's logits (PLAID's z-scaled output bias, VDM's "base measure"):
    with zero network output x0-hat is the posterior mean under a uniform
    token prior, so x0-hat stays exact as t -> 0 where the diffusion weight
    exp(-gamma) ~ 6e5 would otherwise amplify any network error.
  * `schedule='linear_gamma'` (schedules.py), defaults gamma in
    [gamma_min, gamma_max] = [-13.3, 5.0] (VDM's CIFAR-10 range): with unit-norm
    embeddings the decoder std exp(gamma_min / 2) ~ 1e-3 makes the
    reconstruction term ~0 and the prior costs ~0.004 nats per token.
  * Self-conditioning (PLAID, Chen et al. 2022): training draws one coin per
    batch; with probability `self_cond_rate` a stop-gradient first pass gives
    the x0-hat fed to the second. `nll_bound` and `reverse_step` always use
    the two-pass prediction; either way x0-hat is a deterministic function of
    z_t, so the bound stays a valid VLB. The shared sampling loop instead
    carries the previous step's x0-hat as sampler state (PLAID's sample.py),
    one network call per step. `SamplingOptions.temperature` divides eps-hat
    (PLAID's score temperature).
  * With `learned_schedule` gamma comes from `denoiser.gamma` (its slope by
    jax.jvp) and receives the plain ELBO gradient; VDM's variance-minimising
    schedule gradient is not implemented.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

from diffusion_text.processes import vdm_decoder
from diffusion_text.processes.vdm_decoder import alpha_sigma
from diffusion_text.processes.base import (Array, Bound, Denoiser, LossOutput,
                                           ModelSpec, Process, SamplingOptions,
                                           bound_as_loss, make_bound,
                                           map_logits, masked_sum)
from diffusion_text.processes.schedules import check_schedule, make_schedule


def _unit_rows(e_VxD: Array) -> Array:
  return e_VxD / (jnp.linalg.norm(e_VxD, axis=-1, keepdims=True) + 1e-8)


# embed_norm -> the map applied to the learned table E [V, D]
_EMBED_NORMS = {"unit": _unit_rows, "none": lambda e_VxD: e_VxD}


@dataclasses.dataclass(frozen=True)
class GaussianVLBProcess(Process):
  """VDM/PLAID continuous-time Gaussian diffusion with the exact VLB."""

  latent_dim: int = 64            # embedding width D
  schedule: str = "linear_gamma"  # gamma(t) = -log SNR (schedules.py)
  gamma_min: float = -13.3        # gamma(0) = -log SNR at t = 0 (VDM)
  gamma_max: float = 5.0          # gamma(1) = -log SNR at t = 1 (VDM)
  learned_schedule: bool = False  # gamma(t) from denoiser.gamma, else the line
  self_conditioning: bool = True  # PLAID two-pass x0-hat
  self_cond_rate: float = 0.5     # training: chance of the self-cond pass
  num_steps: int = 256            # default number of sampler steps
  embed_norm: str = "unit"        # 'unit' (rows of E have norm 1) or 'none'
  base_logits: bool = True        # add the exact Gaussian logits to the net's

  SAMPLERS = ("ancestral",)
  SAMPLING_KNOBS = ("temperature",)  # PLAID: eps-hat /= temperature

  def __post_init__(self):
    check_schedule(self.schedule, ("linear_gamma",), "gaussian_vlb")
    if self.embed_norm not in _EMBED_NORMS:
      raise ValueError(f"embed_norm={self.embed_norm!r}; choose one of "
                       f"{', '.join(_EMBED_NORMS)}")
    if not self.gamma_max > self.gamma_min:
      raise ValueError(f"need gamma_min < gamma_max, got gamma_min="
                       f"{self.gamma_min}, gamma_max={self.gamma_max}")

  @property
  def model_spec(self) -> ModelSpec:
    return ModelSpec(
        input="latents", latent_dim=self.latent_dim, output="logits",
        output_dim=self.vocab_size, embed_vocab=self.vocab_size,
        self_conditioning=self.self_conditioning,
        learned_schedule=self.learned_schedule,
        gamma_range=(self.gamma_min, self.gamma_max))

  # ---- schedule ------------------------------------------------------------
  def gamma(self, t: Array, denoiser: Optional[Denoiser] = None) -> Array:
    """gamma(t) = -log SNR(t), elementwise over t [N] (or a scalar)."""
    t = jnp.asarray(t, jnp.float32)
    if not self.learned_schedule:
      return make_schedule(self.schedule, gamma_min=self.gamma_min,
                           gamma_max=self.gamma_max).gamma(t)
    if denoiser is None or denoiser.gamma is None:
      raise ValueError("learned_schedule=True needs a Denoiser with .gamma")
    return denoiser.gamma(t.reshape(-1)).reshape(t.shape).astype(jnp.float32)

  def gamma_and_slope(self, t_B: Array, denoiser: Optional[Denoiser] = None
                      ) -> tuple[Array, Array]:
    """(gamma(t), d gamma / dt) at t [B]; the slope by forward-mode AD."""
    t_B = jnp.asarray(t_B, jnp.float32)
    return jax.jvp(lambda t: self.gamma(t, denoiser), (t_B,),
                   (jnp.ones_like(t_B),))

  def embeddings(self, denoiser: Denoiser) -> Array:
    """The token embedding table E [V, D] the process diffuses."""
    e_VxD = denoiser.embed(jnp.arange(self.vocab_size)[None])[0]
    return _EMBED_NORMS[self.embed_norm](e_VxD.astype(jnp.float32))

  # ---- training --------------------------------------------------------------
  def sample_time(self, key: Array, batch: int) -> Array:
    """Antithetic (low-discrepancy) times in (0, 1], each uniform (VDM)."""
    u = jax.random.uniform(key, ())
    return 1.0 - jnp.mod(u + jnp.arange(batch) / batch, 1.0)

  def corrupt(self, key: Array, x0: Array, t: Array,
              denoiser: Optional[Denoiser] = None) -> Array:
    """z_t ~ N(alpha_t x0, sigma_t^2 I); x0 are latents [B, L, D]
    (embed ids first with `embeddings(denoiser)[ids]`)."""
    if x0.ndim != 3:
      raise ValueError("gaussian_vlb corrupts latents [B, L, D]; embed token "
                       "ids first with process.embeddings(denoiser)[ids]")
    gamma_B = self.gamma(jnp.broadcast_to(t, x0.shape[:1]), denoiser)
    return self._diffuse(key, x0, gamma_B)

  def _diffuse(self, key: Array, x_BxLxD: Array, gamma_B: Array) -> Array:
    alpha_B, sigma_B = alpha_sigma(gamma_B)
    eps_BxLxD = jax.random.normal(key, x_BxLxD.shape, jnp.float32)
    return (alpha_B[:, None, None] * x_BxLxD
            + sigma_B[:, None, None] * eps_BxLxD)

  def _add_base(self, logits_NxV: Array, z_NxD: Array, gamma_N: Array,
                e_VxD: Array) -> Array:
    """Logits plus the exact Gaussian part; gamma has z's leading shape
    (or broadcasts to it)."""
    if not self.base_logits:
      return logits_NxV
    snr_N = jnp.exp(-gamma_N)
    alpha_N, _ = alpha_sigma(gamma_N)
    # alpha / sigma^2 = alpha * (1 + SNR), stable for very negative gamma.
    scale_N = alpha_N * (1.0 + snr_N)
    sqnorm_V = jnp.sum(e_VxD ** 2, axis=-1)
    # scale <z, e_v> - SNR ||e_v||^2 / 2 as one matmul, [scale z, -SNR/2]
    # . [e_v, ||e_v||^2]: no [.., V] broadcast of the per-row factors.
    lhs = jnp.concatenate(
        [scale_N[..., None] * z_NxD,
         jnp.broadcast_to(-0.5 * snr_N[..., None], z_NxD.shape[:-1] + (1,))],
        axis=-1)
    rhs = jnp.concatenate([e_VxD, sqnorm_V[:, None]], axis=-1)
    return logits_NxV + jnp.einsum("...d,vd->...v", lhs, rhs)

  def _x0hat(self, logits_BxLxV: Array, e_VxD: Array) -> Array:
    return jnp.einsum("...v,vd->...d", jax.nn.softmax(logits_BxLxV, -1), e_VxD)

  def _net_x0hat(self, denoiser: Denoiser, z_BxLxD: Array, t_B: Array,
                 gamma_B: Array, e_VxD: Array, self_cond: Optional[Array],
                 target: Optional[Array] = None, weights=None) -> Array:
    """x0-hat = softmax(network logits + the exact Gaussian part) @ E at
    z_t, a chunk of positions at a time (base.map_logits): no [B, L, V]
    logits or softmax in either pass. With
    `target` [B, L, D]: ||target - x0hat||^2 per position [B, L] instead,
    and `weights` [B, L], its loss weights (the chunked head then forms
    its gradient in the forward pass; base.map_logits)."""
    def x0hat(logits_NxV, rows):
      z_NxD, gamma_N = rows[:2]
      x0hat_NxD = self._x0hat(self._add_base(logits_NxV, z_NxD, gamma_N,
                                             e_VxD), e_VxD)
      if target is None:
        return x0hat_NxD
      return jnp.sum((rows[2] - x0hat_NxD) ** 2, -1)

    kwargs = {"self_cond": self_cond} if self.self_conditioning else {}
    gamma_BxL = jnp.broadcast_to(gamma_B[:, None], z_BxLxD.shape[:2])
    rows = (z_BxLxD, gamma_BxL) + (() if target is None else (target,))
    return map_logits(denoiser, z_BxLxD, t_B, x0hat, rows, weights=weights,
                      **kwargs)

  def _self_cond(self, denoiser: Denoiser, z_BxLxD: Array, t_B: Array,
                 gamma_B: Array, e_VxD: Array,
                 self_cond_key: Optional[Array] = None) -> Optional[Array]:
    """The self-conditioning input of the prediction at z_t: the first
    pass's x0-hat (no gradient), or with `self_cond_key` (training) that on
    a coin flip and zeros otherwise; None without self-conditioning."""
    if not self.self_conditioning:
      return None
    zeros = jnp.zeros_like(z_BxLxD)

    def first_pass():
      return jax.lax.stop_gradient(self._net_x0hat(
          denoiser, z_BxLxD, t_B, gamma_B, e_VxD, zeros))

    if self_cond_key is None:
      return first_pass()
    use = jax.random.bernoulli(self_cond_key, self.self_cond_rate)
    return jax.lax.cond(use, first_pass, lambda: zeros)

  def predict_x0(self, denoiser: Denoiser, z_BxLxD: Array, t_B: Array,
                 gamma_B: Array, e_VxD: Array,
                 self_cond_key: Optional[Array] = None) -> Array:
    """x0-hat(z_t). With self-conditioning: the two-pass prediction, or with
    `self_cond_key` (training) the second pass only on a coin flip."""
    return self._net_x0hat(denoiser, z_BxLxD, t_B, gamma_B, e_VxD,
                           self._self_cond(denoiser, z_BxLxD, t_B, gamma_B,
                                           e_VxD, self_cond_key))

  def decoder_logits(self, z0_BxLxD: Array, e_VxD: Array,
                     gamma0: Array) -> Array:
    """VDM's decoder logits [B, L, V] (`vdm_decoder.logits`)."""
    return vdm_decoder.logits(z0_BxLxD, e_VxD, gamma0)

  def decoder_nll(self, z0_BxLxD: Array, tokens: Array, e_VxD: Array,
                  gamma0: Array) -> Array:
    """-log p(w | z_0) [B, L], accurate in float32 (`vdm_decoder.nll`)."""
    return vdm_decoder.nll(z0_BxLxD, tokens, e_VxD, gamma0)

  def _reconstruction(self, z0_BxLxD: Array, tokens: Array, e_VxD: Array,
                      gamma0: Array) -> Array:
    """`decoder_nll` a chunk at a time, skipped where exactly 0
    (`vdm_decoder.reconstruction`)."""
    return vdm_decoder.reconstruction(z0_BxLxD, tokens, e_VxD, gamma0)

  def _terms(self, key: Array, denoiser: Denoiser, tokens: Array, mask: Array,
             train: bool) -> dict[str, Array]:
    t_key, z_key, rec_key, sc_key = jax.random.split(key, 4)
    batch = tokens.shape[0]
    e_VxD = self.embeddings(denoiser)
    x_BxLxD = jnp.take(e_VxD, tokens, axis=0)
    gamma_ends = self.gamma(jnp.array([0.0, 1.0]), denoiser)
    gamma0, gamma1 = gamma_ends[0], gamma_ends[1]

    # Prior: KL(N(alpha_1 x, sigma_1^2 I) || N(0, I)) per position, using
    # sigma^2 - 1 - log sigma^2 = softplus(-gamma) - sigmoid(-gamma).
    alpha1_sq = jax.nn.sigmoid(-gamma1)
    kl_BxL = 0.5 * (alpha1_sq * jnp.sum(x_BxLxD ** 2, -1) + self.latent_dim
                    * (jax.nn.softplus(-gamma1) - alpha1_sq))
    # Reconstruction: z_0 / alpha_0 = x + exp(gamma_0 / 2) eps (vdm.py).
    eps0_BxLxD = jax.random.normal(rec_key, x_BxLxD.shape, jnp.float32)
    z0_BxLxD = alpha_sigma(gamma0)[0] * (
        x_BxLxD + jnp.exp(0.5 * gamma0) * eps0_BxLxD)
    rec_BxL = self._reconstruction(z0_BxLxD, tokens, e_VxD, gamma0)
    # Diffusion: VDM eq. 17 with x-prediction, one antithetic t per sequence.
    t_B = self.sample_time(t_key, batch)
    gamma_B, dgamma_B = self.gamma_and_slope(t_B, denoiser)
    z_BxLxD = self._diffuse(z_key, x_BxLxD, gamma_B)
    weight_B = 0.5 * dgamma_B * jnp.exp(-gamma_B)
    # ||x - x0-hat(z_t)||^2 per position, inside the chunked head.
    self_cond = self._self_cond(denoiser, z_BxLxD, t_B, gamma_B, e_VxD,
                                sc_key if train else None)
    sq_BxL = self._net_x0hat(denoiser, z_BxLxD, t_B, gamma_B, e_VxD,
                             self_cond, target=x_BxLxD,
                             weights=weight_B[:, None] * mask)
    return {
        "prior": masked_sum(kl_BxL, mask),
        "diffusion": weight_B * masked_sum(sq_BxL, mask),
        "reconstruction": masked_sum(rec_BxL, mask),
    }

  def loss(self, key: Array, denoiser: Denoiser, tokens: Array,
           mask: Array) -> LossOutput:
    """The VLB per token itself (VDM, PLAID), with self-conditioning dropout."""
    terms = self._terms(key, denoiser, tokens, mask, train=True)
    return bound_as_loss(make_bound(terms), mask)

  def nll_bound(self, key: Array, denoiser: Denoiser, tokens: Array,
                mask: Array) -> Bound:
    return make_bound(self._terms(key, denoiser, tokens, mask, train=False))

  # ---- sampling --------------------------------------------------------------
  def prior(self, key: Array, shape: tuple[int, int]) -> Array:
    return jax.random.normal(key, (*shape, self.latent_dim), jnp.float32)

  def reverse_step(self, key: Array, denoiser: Denoiser, x_t: Array,
                   t: Array, s: Array,
                   options: SamplingOptions = SamplingOptions()) -> Array:
    """Ancestral step z_t -> z_s from q(z_s | z_t, x = x0-hat) (VDM app. A.4,
    eq. 33) with the two-pass x0-hat; s == 0 gives the mean."""
    return self._step(key, denoiser, x_t, t, s, None, options)[0]

  def init_sampler_state(self, x_T: Array,
                         options: SamplingOptions = SamplingOptions()) -> Array:
    """The previous step's x0-hat, fed back as self-conditioning (zeros)."""
    del options
    return jnp.zeros_like(x_T)

  def reverse_step_with_state(self, key: Array, denoiser: Denoiser, x_t: Array,
                              t: Array, s: Array, state: Array,
                              options: SamplingOptions = SamplingOptions()
                              ) -> tuple[Array, Array]:
    """As `reverse_step`, but self-conditioned on the previous step's x0-hat
    (PLAID's sampler): one network call per step instead of two."""
    self_cond = state if self.self_conditioning else None
    return self._step(key, denoiser, x_t, t, s, self_cond, options)

  def _step(self, key: Array, denoiser: Denoiser, x_t: Array, t: Array,
            s: Array, self_cond: Optional[Array],
            options: SamplingOptions) -> tuple[Array, Array]:
    self.sampler(options)  # validates the name and knobs
    temperature = options.temperature
    batch = x_t.shape[0]
    t_B = jnp.full((batch,), t, jnp.float32)
    gammas = self.gamma(jnp.stack([jnp.asarray(t, jnp.float32),
                                   jnp.asarray(s, jnp.float32)]), denoiser)
    gamma_t, gamma_s = gammas[0], gammas[1]
    alpha_t, sigma_t = alpha_sigma(gamma_t)
    alpha_s, sigma_s = alpha_sigma(gamma_s)
    e_VxD = self.embeddings(denoiser)
    gamma_B = jnp.full((batch,), gamma_t)
    if self_cond is None:
      x0hat_BxLxD = self.predict_x0(denoiser, x_t, t_B, gamma_B, e_VxD)
    else:
      # Chunked (the same numbers as the dense softmax; ~1.5x faster here).
      x0hat_BxLxD = self._net_x0hat(denoiser, x_t, t_B, gamma_B, e_VxD,
                                    self_cond)
    x0_BxLxD = x0hat_BxLxD
    if temperature == 0.0:
      raise ValueError("gaussian_vlb divides eps-hat by the temperature: "
                       "use temperature > 0")
    if temperature != 1.0:
      # PLAID: divide eps-hat by the temperature, then re-derive x0-hat.
      eps_hat = (x_t - alpha_t * x0hat_BxLxD) / sigma_t / temperature
      x0_BxLxD = (x_t - sigma_t * eps_hat) / alpha_t
    c = -jnp.expm1(gamma_s - gamma_t)  # 1 - SNR(t) / SNR(s)
    mean = alpha_s / alpha_t * (1.0 - c) * x_t + c * alpha_s * x0_BxLxD
    std = jnp.where(s > 0, jnp.sqrt(c) * sigma_s, 0.0)
    z_s = mean + std * jax.random.normal(key, x_t.shape, jnp.float32)
    return z_s, x0hat_BxLxD

  def decode(self, denoiser: Denoiser, x0: Array,
             options: SamplingOptions = SamplingOptions()) -> Array:
    """Most likely token under the VDM decoder (the nearest embedding)."""
    del options
    gamma0 = self.gamma(jnp.zeros((1,)), denoiser)[0]
    logits = self.decoder_logits(x0, self.embeddings(denoiser), gamma0)
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)

  def clean_state(self, denoiser: Denoiser, tokens: Array) -> Array:
    return jnp.take(self.embeddings(denoiser), tokens, axis=0)

  def impose(self, key: Array, denoiser: Denoiser, x_t: Array, t: Array,
             tokens: Array, cond_mask: Array) -> Array:
    """Replacement: fixed positions get alpha_t e_w + sigma_t eps (at t = 0
    the noise-free alpha_0 e_w, which decodes to w)."""
    e_VxD = self.embeddings(denoiser)
    x_BxLxD = jnp.take(e_VxD, tokens, axis=0)
    gamma_B = self.gamma(jnp.broadcast_to(t, x_t.shape[:1]), denoiser)
    alpha_B, sigma_B = alpha_sigma(gamma_B)
    sigma_B = jnp.where(jnp.broadcast_to(t, x_t.shape[:1]) > 0, sigma_B, 0.0)
    z_BxLxD = (alpha_B[:, None, None] * x_BxLxD + sigma_B[:, None, None]
               * jax.random.normal(key, x_t.shape, jnp.float32))
    return jnp.where(cond_mask.astype(bool)[..., None], z_BxLxD, x_t)
