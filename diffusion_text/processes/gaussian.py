"""Gaussian diffusion on learned token embeddings, discrete time (T steps).

DDPM (Ho et al. 2020) run on the latent chain of Diffusion-LM (Li et al.
2022): a token sequence w is embedded deterministically, x_0 = E[w], and
noised by the variance-preserving chain
  q(x_t | x_0) = N(sqrt(ab_t) x_0, (1 - ab_t) I)            (Ho eq. 4)
with ab_i = schedule.alpha(i / T), beta_i = 1 - ab_i / ab_{i-1}.

Parameterisation (`base_eps=True`, default): the network predicts a
residual on top of the exact eps for uniform tokens on the table E,
  q(w | x_t) = softmax_w(sqrt(ab)/(1-ab) <x_t, e_w> - ab/(2(1-ab)) ||e_w||^2),
  x0_base = q(. | x_t) @ E,  eps_base = (x_t - sqrt(ab) x0_base) / sqrt(1-ab),
  eps_hat = eps_base + net(x_t, t),  x0_hat = x0_base - sqrt((1-ab)/ab) net
(the discrete-data "base measure" of gaussian_vlb's `base_logits`). Near
t = 0 the tokens are resolved, eps_base is the drawn eps to float precision,
and the SNR-ratio weight no longer amplifies network error; with the
backbone's zero-initialised head the model starts at eps_base. Cost: a
V-way softmax and two V x D matmuls per position, computed a chunk of
positions at a time with a custom VJP (`gaussian_posterior.softmax_mean`),
so no [B, L, V] array is held.

Training objective (`loss`), per real token:
  L_simple = ||eps - eps_hat(x_t, t)||^2 / D                      (Ho eq. 14)
  + rounding_weight * -log p(w | x_1)                 (Diffusion-LM eq. 2)
  + prior_weight * KL(q(x_T | x_0) || N(0, I))
  + vlb_weight * (the diffusion-sum estimate below)  (Nichol & Dhariwal 2021
    hybrid L_simple + lambda L_vlb; 0 by default: on the synthetic corpus it
    did not beat plain L_simple beyond noise).
The step is drawn from the bound's proposal (`train_steps='proposal'`,
default, an eps-MSE weighted by T p(i) towards where the KL mass is; it
tightened the synthetic bound by ~0.1 nats/token) or uniformly on {1..T}
('uniform', Ho's L_simple).
The eps-MSE alone is minimised by collapsing the embeddings (Diffusion-LM
sec. 4.1); the rounding term at x_1 keeps the tokens apart and the prior
term bounds their norm.

Bound (`nll_bound`): the full discrete-time VLB of the latent chain (Ho
eq. 5). Because x_0 = E[w] is deterministic, q(x_{1:T} | w) is a proper
distribution and
  -log p(w) <= KL(q(x_T|x_0) || N(0,I))
               + sum_{t=2..T} KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t))
               + E_q[-log p(w | x_1)],
with p(w | x_1) = softmax(round_logits(x0_hat(x_1))). The sum is estimated
by importance sampling one step i ~ p per sequence: KL_i / p(i) is unbiased
whenever p > 0 on every step, which the uniform `proposal_floor` share
guarantees. `step_proposal='table'` (default) puts p where a Gaussian source
of the table's variance reveals information (I-MMSE) and cuts it off once the
nearest tokens are resolved (see `step_probs`); it is a deterministic,
stop-gradient function of E, not of the draws, so the estimate stays
unbiased; 'uniform' is the plain (T - 1) KL_i. The reverse kernel is
p(x_s | x_t) = N(mu~(x_t, x0_hat), sigma^2 I) with mu~ the posterior mean
(Ho eq. 7) and sigma^2 = beta~ (posterior variance, default; then the KL is
exactly 0.5 (SNR_s / SNR_t - 1) ||eps - eps_hat||^2, Ho eq. 12) or beta
(`reverse_variance='beta'`, whose variance mismatch constants are kept).
Padded positions are left out of every sum; their latents carry no
information about the real tokens, so the result is still a bound.

Samplers (`SamplingOptions.sampler`): 'ddpm' ancestral (Ho Algorithm 2,
for any s < t) and 'ddim' (Song et al. 2021 eq. 12), both reading alpha-bar from the continuous schedule so any
step count works; `clamp` snaps x0_hat to the nearest embedding before each
step (Diffusion-LM sec. 4.2).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from diffusion_text.contract import cross_entropy, map_rows
from diffusion_text.processes.gaussian_posterior import (nearest_ids,
                                                        posterior_mean)
from diffusion_text.processes.base import (Array, Bound, Denoiser,
                                           LossOutput, ModelSpec, Process,
                                           SamplingOptions, make_bound,
                                           masked_sum, per_token)
from diffusion_text.processes.gaussian_choices import (
    PROPOSALS, REVERSE_VARIANCES, SAMPLER_STEPS, TRAIN_DRAWS, bcast as _bcast,
    check_choice as _check)
from diffusion_text.processes.schedules import (Schedule, check_schedule,
                                                make_schedule)

_TINY = 1e-12


@dataclasses.dataclass(frozen=True)
class GaussianProcess(Process):
  """DDPM on Diffusion-LM embeddings with eps-prediction (see module doc)."""

  num_steps: int = 1000  # T; step i sits at t_i = i / T.
  schedule: str = "cosine_vp"  # alpha-bar(t): 'cosine_vp' or 'linear_beta'.
  latent_dim: int = 64  # D, the embedding width.
  rounding_weight: float = 1.0  # weight of -log p(w | x_1) in the loss.
  prior_weight: float = 1.0  # weight of KL(q(x_T | x_0) || N(0, I)) in the loss.
  ddim_eta: float = 0.0  # DDIM stochasticity; 1.0 matches DDPM's beta~.
  clamp: bool = False  # snap x0_hat to the nearest embedding while sampling.
  reverse_variance: str = "posterior"  # sigma_t^2: 'posterior' beta~ or 'beta'.
  base_eps: bool = True  # eps_hat = exact-posterior eps_base + net residual.
  step_proposal: str = "table"  # law of the bound's step: 'table'/'uniform'.
  proposal_floor: float = 0.1  # uniform share mixed into the proposal.
  train_steps: str = "proposal"  # the training draw: 'proposal' or 'uniform'.
  vlb_weight: float = 0.0  # lambda of the hybrid L_simple + lambda L_vlb.

  SAMPLERS = ("ddpm", "ddim")

  def __post_init__(self):
    if self.num_steps < 1:
      raise ValueError(f"num_steps must be >= 1, got {self.num_steps}")
    check_schedule(self.schedule, ("cosine_vp", "linear_beta"), "gaussian")
    _check("reverse_variance", self.reverse_variance, REVERSE_VARIANCES)
    _check("step_proposal", self.step_proposal, PROPOSALS)
    _check("train_steps", self.train_steps, TRAIN_DRAWS)
    if not 0.0 < self.proposal_floor <= 1.0:
      raise ValueError("proposal_floor must be in (0, 1] so that every step "
                       f"has positive probability, got {self.proposal_floor}")
    if self.vlb_weight < 0:
      raise ValueError(f"vlb_weight must be >= 0, got {self.vlb_weight}")

  @property
  def noise_schedule(self) -> Schedule:
    # linear_beta takes num_steps (its beta_i = linspace over T steps).
    return make_schedule(self.schedule, num_steps=self.num_steps)

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
    return REVERSE_VARIANCES[self.reverse_variance].variance(
        self.alpha_bar(s), self.alpha_bar(t))

  def embedding_table(self, denoiser: Denoiser) -> Array:
    """The learned token embeddings E [V, D] (float32)."""
    table_VxD = denoiser.embed(jnp.arange(self.vocab_size)[None])[0]
    return table_VxD.astype(jnp.float32)

  def base_coefficients(self, t: Array) -> Array:
    """(a, b, c) = (sqrt(ab), ab / 2, 1 - ab) per sequence [B, 3], so that
    log q(w | x_t) = (a <x_t, e_w> - b ||e_w||^2) / c + const
    (`gaussian_posterior.base_logits`)."""
    ab_B = jnp.atleast_1d(self.alpha_bar(t))
    # 1 - ab_1 ~ 4e-5 (cosine_vp, T = 1000): logits ~ 1e5 are fine for the
    # max-subtracting softmax; the floor only guards ab == 1 (t = 0).
    return jnp.stack([jnp.sqrt(ab_B), 0.5 * ab_B,
                      jnp.maximum(1.0 - ab_B, _TINY)], axis=-1)

  def _complete(self, denoiser: Denoiser, x_t: Array, t_B: Array,
                net: Array, tokens: Array | None = None
                ) -> tuple[Array, Array]:
    """(x0_hat, eps_hat) from the network output `net` at (x_t, t_B);
    `tokens`: see `gaussian_posterior.posterior_mean`."""
    ab_t = _bcast(self.alpha_bar(t_B), x_t)
    if not self.base_eps:
      return (x_t - jnp.sqrt(1.0 - ab_t) * net) / jnp.sqrt(ab_t), net
    x0_base = posterior_mean(x_t, self.base_coefficients(t_B),
                             self.embedding_table(denoiser), tokens)
    eps_base = ((x_t - jnp.sqrt(ab_t) * x0_base)
                / jnp.sqrt(jnp.maximum(1.0 - ab_t, _TINY)))
    # x0_hat from x0_base directly: no x_t - sqrt(1-ab) eps cancellation.
    x0_hat = x0_base - jnp.sqrt((1.0 - ab_t) / ab_t) * net
    return x0_hat, eps_base + net

  def predict_x0(self, denoiser: Denoiser, x_t: Array,
                 t: Array) -> tuple[Array, Array]:
    """(x0_hat, eps_hat) from the eps-prediction at x_t; t scalar or [B]."""
    t_B = jnp.broadcast_to(jnp.asarray(t, jnp.float32), x_t.shape[:1])
    net = denoiser.predict(x_t, t_B).astype(jnp.float32)
    return self._complete(denoiser, x_t, t_B, net)

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
    weight, const = REVERSE_VARIANCES[self.reverse_variance].kl_parts(
        ab_s, ab_t, eps.shape[-1])
    return 0.5 * (weight * sq_err + const)

  def diffusion_kl(self, denoiser: Denoiser, x0: Array, x_t: Array, s: Array,
                   t: Array) -> Array:
    """KL(q(x_s|x_t,x_0) || p(x_s|x_t)) per position [B, L]; s, t: [B]."""
    ab_t = _bcast(self.alpha_bar(t), x_t)
    eps = (x_t - jnp.sqrt(ab_t) * x0) / jnp.sqrt(1.0 - ab_t)
    _, eps_hat = self.predict_x0(denoiser, x_t, t)
    return self._kl_from_eps(eps, eps_hat, s, t)

  # ---- step proposal --------------------------------------------------------
  def step_probs(self, denoiser: Denoiser) -> Array:
    """p(i) for the bound's step i = 2..T, [T - 1], sums to 1 (the law
    `step_proposal` names in gaussian_choices.py)."""
    return PROPOSALS[self.step_proposal](self, denoiser)

  def sample_step(self, key: Array, batch: int,
                  denoiser: Denoiser) -> tuple[Array, Array]:
    """Bound steps i [B] in {2..T} from the proposal and 1 / p(i) [B]."""
    probs_I = self.step_probs(denoiser)
    step_B = 2 + jax.random.categorical(key, jnp.log(probs_I), shape=(batch,))
    return step_B, 1.0 / probs_I[step_B - 2]

  # ---- training -------------------------------------------------------------
  def sample_time(self, key: Array, batch: int) -> Array:
    """Uniform steps i / T, i in {1..T} (the loss's proposal draw needs the
    embedding table, so it goes through `sample_step`)."""
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
                    x_1: Array, tokens: Array) -> tuple[Array, Array]:
    """eps_hat at (x_a, t_a) and x0_hat at (x_1, 1/T), one network call.

    At t = 1/T the tokens x_1 was drawn from are resolved, so x0_base(x_1)
    takes the exact one-hot shortcut of `posterior_mean` when it applies."""
    batch = x_a.shape[0]
    t_1 = jnp.full((batch,), 1.0 / self.num_steps)
    x = jnp.concatenate([x_a, x_1])
    net = denoiser.predict(x, jnp.concatenate([t_a, t_1])).astype(jnp.float32)
    _, eps_hat = self._complete(denoiser, x_a, t_a, net[:batch])
    x0_hat_1, _ = self._complete(denoiser, x_1, t_1, net[batch:],
                                 tokens=tokens)
    return eps_hat, x0_hat_1

  def _reconstruction(self, denoiser: Denoiser, x0_hat_1: Array,
                      tokens: Array) -> Array:
    """-log p(w | x_1) per position [B, L], from x0_hat(x_1): the model's
    fused rounding CE where it has one, else a chunk of positions at a
    time (no [B, L, V] rounding logits either way)."""
    if denoiser.round_nll is not None:
      return denoiser.round_nll(x0_hat_1, tokens)

    def nll(rows):
      x_Nx1xD, w_Nx1 = rows
      return cross_entropy(denoiser.round_logits(x_Nx1xD), w_Nx1)

    return map_rows(nll, (x0_hat_1.reshape(-1, 1, x0_hat_1.shape[-1]),
                          tokens.reshape(-1, 1))).reshape(tokens.shape)

  def loss(self, key: Array, denoiser: Denoiser, tokens: Array,
           mask: Array) -> LossOutput:
    time_key, noise_key, x1_key = jax.random.split(key, 3)
    T, batch = self.num_steps, tokens.shape[0]
    x0 = denoiser.embed(tokens).astype(jnp.float32)
    draw = TRAIN_DRAWS["uniform" if T < 2 else self.train_steps]
    step_B, inv_p_B = draw(self, time_key, batch, denoiser)
    t_B = step_B / T
    x_t, eps = self._noised(noise_key, x0, t_B)
    x_1, _ = self._noised(x1_key, x0, jnp.full_like(t_B, 1.0 / T))
    eps_hat, x0_hat_1 = self._predict_pair(denoiser, x_t, t_B, x_1,
                                              tokens)

    mse_BxL = jnp.mean(jnp.square(eps - eps_hat), axis=-1)
    recon_BxL = self._reconstruction(denoiser, x0_hat_1, tokens)
    prior_BxL = self.prior_kl(x0)
    safe_step_B = jnp.maximum(step_B, 2)
    kl_BxL = self._kl_from_eps(eps, eps_hat, (safe_step_B - 1) / T,
                               safe_step_B / T)
    diffusion_B = inv_p_B * masked_sum(kl_BxL, mask)
    loss = per_token(masked_sum(mse_BxL + self.rounding_weight * recon_BxL
                                + self.prior_weight * prior_BxL, mask), mask)
    if self.vlb_weight:
      loss = loss + self.vlb_weight * per_token(diffusion_B, mask)

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
      step_B, inv_p_B = self.sample_step(time_key, batch, denoiser)
      t_B = step_B / T
      x_t, eps = self._noised(noise_key, x0, t_B)
      eps_hat, x0_hat_1 = self._predict_pair(denoiser, x_t, t_B, x_1,
                                              tokens)
      kl_BxL = self._kl_from_eps(eps, eps_hat, (step_B - 1) / T, t_B)
      terms["diffusion"] = inv_p_B * masked_sum(kl_BxL, mask)
    else:
      x0_hat_1, _ = self.predict_x0(denoiser, x_1, 1.0 / T)
      terms["diffusion"] = jnp.zeros((batch,), jnp.float32)
    terms["reconstruction"] = masked_sum(
        self._reconstruction(denoiser, x0_hat_1, tokens), mask)
    return make_bound(terms)

  # ---- sampling -------------------------------------------------------------
  def prior(self, key: Array, shape: tuple[int, int]) -> Array:
    return jax.random.normal(key, (*shape, self.latent_dim), jnp.float32)

  def nearest_ids(self, denoiser: Denoiser, x: Array) -> Array:
    """Id of the nearest (L2) embedding to x [B, L, D] -> int32 [B, L]."""
    return nearest_ids(x, self.embedding_table(denoiser))

  def time_grid(self, steps: int, length: int,
                options: SamplingOptions = SamplingOptions()) -> Array:
    """Step skipping: `steps` of the T trained times, evenly spaced, 1..0
    (DDIM sec. 4.2; Nichol & Dhariwal 2021 sec. 4 respacing)."""
    del length, options
    if steps > self.num_steps:
      raise ValueError(f"{steps} sampling steps > num_steps={self.num_steps}"
                       ": the discrete chain has only T steps")
    T = self.num_steps
    return jnp.round(jnp.linspace(1.0, 0.0, steps + 1) * T) / T

  def reverse_step(self, key: Array, denoiser: Denoiser, x_t: Array,
                   t: Array, s: Array,
                   options: SamplingOptions = SamplingOptions()) -> Array:
    """x_s from x_t (scalars t > s); at s == 0 the mean x0_hat, no noise."""
    step_fn = SAMPLER_STEPS[self.sampler(options)]
    x0_hat, eps_hat = self.predict_x0(denoiser, x_t, t)
    ab_t = self.alpha_bar(t)
    if self.clamp:
      table_VxD = self.embedding_table(denoiser)
      x0_hat = jnp.take(table_VxD, nearest_ids(x0_hat, table_VxD), axis=0)
      eps_hat = (x_t - jnp.sqrt(ab_t) * x0_hat) / jnp.sqrt(1.0 - ab_t)
    mean, var = step_fn(self, x_t, x0_hat, eps_hat, s, t)
    x_s = mean + jnp.sqrt(var) * jax.random.normal(key, x_t.shape)
    return jnp.where(s > 0, x_s, x0_hat)

  def decode(self, denoiser: Denoiser, x0: Array,
             options: SamplingOptions = SamplingOptions()) -> Array:
    """The nearest embedding's id (x0 is the sampler's final x0-hat)."""
    del options
    return self.nearest_ids(denoiser, x0)

  def clean_state(self, denoiser: Denoiser, tokens: Array) -> Array:
    return denoiser.embed(tokens).astype(jnp.float32)

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

