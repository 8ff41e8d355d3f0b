"""Masked (absorbing-state) diffusion in continuous time: MDLM and MD4.

Sahoo et al. 2024 ("Simple and Effective Masked Diffusion Language Models",
MDLM) and Shi et al. 2024 ("Simplified and Generalized Masked Diffusion",
MD4). Each token is independently replaced by [MASK] (id = vocab_size) with
probability 1 - alpha(t) (MDLM eq. 2). The network maps x_t to logits over the
V data tokens only, so it can never predict [MASK] (MDLM sec. 3.2.1, "zero
masking"), and unmasked tokens are copied through ("carry-over unmasking").

Negative ELBO (MDLM eq. 10 / MD4 eq. 5), per sequence:

  diffusion = int_{t_min}^1 -alpha'(t) / (1 - alpha(t))
                * E_q[ sum_{i masked in x_t} -log p(x0_i | x_t) ] dt,

estimated with one time per sequence, t ~ U(t_min, 1] (antithetic across the
batch, MD4 sec. 4), times (1 - t_min). Because the integral starts at t_min
rather than 0, the bound adds a reconstruction term: at t_min the positions
still masked (probability 1 - alpha(t_min)) are decoded uniformly, costing
(1 - alpha(t_min)) log V nats each in expectation (exactly 0 for t_min = 0,
where alpha(0) = 1: the continuous-time ELBO has no reconstruction term). The
prior p(x_1) masks each token with probability 1 - alpha(1) and otherwise
draws it uniformly; its KL to q(x_1 | x0) is alpha(1) log V per token,
exactly 0 when alpha(1) = 0 (both schedules here, after clipping rounding).

Sampling (`SamplingOptions`: sampler, temperature, top_k, top_p, float64):
'ancestral' on any time grid (MDLM eq. 7 / MD4 Alg. 2), or 'cached' (MDLM
sec. 4.2). Each step first decides which [MASK]s unmask, then draws tokens
only there (`draws.draw_where`); 'cached' also runs the network only on the
sequences where a token unmasks (and skips the call when none does), which
gives the ancestral result with less work (a sequence where nothing unmasks
never reads its prediction; identical up to float rounding across batch
sizes). 'confidence', 'margin' and 'entropy' unmask the most confident
positions first (masked_samplers.py; MaskGIT / LLaDA); 'remdm_cap',
'remdm_rescale' and 'remdm_loop' may remask generated tokens (ReMDM). With
`time_conditioning=False` (MDLM's time-unconditioned models, sec. 4.2) the
network always sees t = 0.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from diffusion_text.processes import base, draws, masked_samplers, transitions
from diffusion_text.processes.base import SamplingOptions
from diffusion_text.processes.schedules import (Schedule, check_schedule,
                                                make_schedule)

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class MaskedProcess(transitions.AbsorbingStates, base.Process):
  """Continuous-time absorbing diffusion (MDLM / MD4)."""

  schedule: str = "linear"        # 'linear' (alpha = 1 - t), 'cosine', ...
  antithetic: bool = True         # stratified training times over the batch
  t_min: float = 1e-5             # times are drawn from (t_min, 1]
  num_steps: int = 128            # default number of sampler steps
  time_conditioning: bool = True  # False: the network sees t = 0 (exact caching)

  SAMPLERS = (("ancestral", "cached") + tuple(masked_samplers.SCORES)
              + tuple(masked_samplers.REMASKING))
  SAMPLING_KNOBS = ("temperature", "top_k", "top_p", "block_length")

  def __post_init__(self):
    check_schedule(self.schedule, process="masked")
    if not 0.0 <= self.t_min < 1.0:
      raise ValueError(f"t_min must be in [0, 1), got {self.t_min}")

  # ---- schedule ------------------------------------------------------------
  @property
  def noise_schedule(self) -> Schedule:
    return make_schedule(self.schedule)

  def alpha(self, t: Array) -> Array:
    """Keep probability, clipped to [0, 1] (float32 cos(pi/2) < 0)."""
    return jnp.clip(self.noise_schedule.alpha(t), 0.0, 1.0)

  def mask_prob(self, t: Array) -> Array:
    """1 - alpha(t), without cancellation at small t where the schedule
    knows how (else the ELBO weight there would be inf * 0 = nan)."""
    t = jnp.asarray(t, jnp.float32)
    return jnp.clip(self.noise_schedule.one_minus_alpha(t), 0.0, 1.0)

  def loss_weight(self, t: Array) -> Array:
    """-alpha'(t) / (1 - alpha(t)): the ELBO weight of masked CE at time t."""
    return -self.noise_schedule.dalpha(t) / self.mask_prob(t)

  @property
  def model_spec(self) -> base.ModelSpec:
    return base.ModelSpec(input="tokens", output="logits",
                          output_dim=self.vocab_size,
                          input_vocab=self.transition.num_states)

  # ---- exact math (for tests against brute force) --------------------------
  def marginal_probs(self, x0: Array, t: Array) -> Array:
    """q(x_t | x0) over V + 1 states; t broadcasts against x0."""
    a = jnp.broadcast_to(self.alpha(jnp.asarray(t, jnp.float32)), x0.shape)
    return self.transition.marginal(x0, a)

  def posterior_probs(self, x_t: Array, x0: Array, s: Array,
                      t: Array) -> Array:
    """q(x_s | x_t, x0) over V + 1 states for s < t (MDLM eq. 6)."""
    a_s = jnp.broadcast_to(self.alpha(jnp.asarray(s, jnp.float32)), x0.shape)
    a_t = jnp.broadcast_to(self.alpha(jnp.asarray(t, jnp.float32)), x0.shape)
    # From [MASK], x_s is x0 w.p. (a_s - a_t)/(1 - a_t), else still [MASK]:
    # row x0 of the absorbing Q with that keep probability.
    from_mask = self.transition.marginal(x0, (a_s - a_t) / (1.0 - a_t))
    is_mask = (x_t == self.mask_id)[..., None]
    return jnp.where(is_mask, from_mask,
                     jax.nn.one_hot(x_t, self.transition.num_states))

  # ---- training ------------------------------------------------------------
  def sample_time(self, key: Array, batch: int) -> Array:
    if self.antithetic:  # one uniform, shifted into each of `batch` strata
      u_B = jnp.mod(jax.random.uniform(key, ()) + jnp.arange(batch) / batch,
                    1.0)
    else:
      u_B = jax.random.uniform(key, (batch,))
    return 1.0 - (1.0 - self.t_min) * u_B  # in (t_min, 1]

  def corrupt(self, key: Array, x0: Array, t: Array) -> Array:
    drop_BxL = jax.random.uniform(key, x0.shape) < self.mask_prob(t)[:, None]
    return jnp.where(drop_BxL, self.mask_id, x0).astype(jnp.int32)

  def nll_bound(self, key: Array, denoiser: base.Denoiser, tokens: Array,
                mask: Array) -> base.Bound:
    time_key, noise_key = jax.random.split(key)
    x0_BxL = jnp.clip(tokens, 0, self.vocab_size - 1).astype(jnp.int32)
    t_B = self.sample_time(time_key, x0_BxL.shape[0])
    x_t = self.corrupt(noise_key, x0_BxL, t_B)
    real_BxL = mask.astype(bool)
    masked_BxL = real_BxL & (x_t == self.mask_id)
    weight_B = self.loss_weight(t_B)
    ce_BxL = base.target_nll(denoiser, x_t, self._net_time(t_B), x0_BxL,
                             masked_BxL, weights=weight_B[:, None])
    masked_ce_B = base.masked_sum(ce_BxL, masked_BxL)
    n_B = jnp.sum(real_BxL, axis=-1).astype(jnp.float32)
    one = jnp.ones((), jnp.float32)
    return base.make_bound({
        "diffusion": (1.0 - self.t_min) * weight_B * masked_ce_B,
        "prior": n_B * self.transition.base_prior_kl(self.alpha(one)),
        "reconstruction": n_B * self.mask_prob(self.t_min * one) * math.log(
            self.vocab_size),
    })

  def loss(self, key: Array, denoiser: base.Denoiser, tokens: Array,
           mask: Array) -> base.LossOutput:
    return base.bound_as_loss(self.nll_bound(key, denoiser, tokens, mask), mask)

  # ---- sampling ------------------------------------------------------------
  def prior(self, key: Array, shape: tuple[int, int]) -> Array:
    with jax.ensure_compile_time_eval():
      alpha_1 = float(self.alpha(jnp.ones((), jnp.float32)))
    return self.transition.base_prior(key, shape, alpha_1)

  def _net_time(self, t_B: Array) -> Array:
    """The time the network sees: t, or 0 without time conditioning (the
    masked posterior depends on x_t alone; MDLM sec. 4.2)."""
    return t_B if self.time_conditioning else jnp.zeros_like(t_B)

  def logits(self, denoiser: base.Denoiser, x_t: Array, t: Array) -> Array:
    """Logits of p(x0 | x_t) [B, L, V] in float32."""
    t_B = jnp.full((x_t.shape[0],), t, jnp.float32)
    return denoiser.predict(x_t, self._net_time(t_B)).astype(jnp.float32)

  def x0_probs(self, denoiser: base.Denoiser, x_t: Array, t: Array,
               options: SamplingOptions = SamplingOptions()) -> Array:
    """p~(x0 | x_t) [B, L, V] after temperature, top-k and top-p
    (unnormalised)."""
    logits_BxLxV = self.logits(denoiser, x_t, t)
    if options.temperature == 0.0:
      return jax.nn.one_hot(jnp.argmax(logits_BxLxV, -1), self.vocab_size)
    return draws.filtered_probs(logits_BxLxV, options)

  def unmask_share(self, t: Array, s: Array, length: int,
                   options: SamplingOptions = SamplingOptions()) -> Array:
    """MDLM eq. 7: the chance a [MASK] unmasks from t to s, (a_s - a_t) /
    (1 - a_t), per position [L]. Semi-autoregressive (block_length > 0):
    block j runs the whole schedule on its share [j/n, (j+1)/n) of 1 - t;
    earlier blocks are done (1), later ones wait (0)."""
    def share(t, s):
      m_s, m_t = self.mask_prob(s), self.mask_prob(t)
      return jnp.where(s <= 0.0, 1.0, (m_t - m_s) / m_t)
    if not options.block_length:
      return jnp.broadcast_to(share(t, s), (length,))
    n = -(-length // options.block_length)
    u_t = (1.0 - t) * n
    block = jnp.clip(jnp.floor(u_t + 1e-4), 0, n - 1)
    local_t = jnp.clip(1.0 - (u_t - block), 0.0, 1.0)
    local_s = jnp.clip(1.0 - ((1.0 - s) * n - block), 0.0, 1.0)
    block_L = jnp.arange(length) // options.block_length
    return jnp.where(block_L == block, share(local_t, local_s),
                     (block_L < block).astype(jnp.float32))

  def unmasking(self, key: Array, x_t: Array, t: Array, s: Array,
                options: SamplingOptions = SamplingOptions()) -> Array:
    """Which [MASK]s unmask from t to s -> bool [B, L]."""
    share_L = self.unmask_share(t, s, x_t.shape[1], options)
    return ((x_t == self.mask_id)
            & (jax.random.uniform(key, x_t.shape) < share_L))

  def _step(self, key: Array, denoiser: base.Denoiser, x_t: Array, t: Array,
            s: Array, options: SamplingOptions, lazy: bool) -> Array:
    """Decide the unmasking first, then draw tokens only there; `lazy` runs
    the network only on the sequences where a token unmasks (none: no call),
    which gives the same result."""
    self.sampler(options)  # validates the name and knobs
    unmask_key, token_key = jax.random.split(key)
    unmask_BxL = self.unmasking(unmask_key, x_t, t, s, options)

    def fill(logits_BxLxV):
      x0_BxL = draws.draw_where(token_key, logits_BxLxV, unmask_BxL, options)
      return jnp.where(unmask_BxL, x0_BxL, x_t)

    if not lazy:
      return fill(self.logits(denoiser, x_t, t))
    # Only the sequences where a token unmasks need the network: run it on
    # the smallest bucket of rows (0, 1, 2, 4, ..., B) that holds them.
    batch = x_t.shape[0]
    changing_B = jnp.any(unmask_BxL, axis=-1)
    buckets = sorted({0, batch} | {2 ** i for i in range(batch.bit_length())
                                   if 2 ** i < batch})

    def rows(size):
      def branch():
        rows_K = jnp.nonzero(changing_B, size=size, fill_value=batch)[0]
        logits_KxLxV = self.logits(denoiser, x_t[jnp.minimum(rows_K,
                                                             batch - 1)], t)
        logits_BxLxV = jnp.zeros(x_t.shape + logits_KxLxV.shape[-1:],
                                 logits_KxLxV.dtype)
        return fill(logits_BxLxV.at[rows_K].set(logits_KxLxV, mode="drop"))
      return branch if size else (lambda: x_t)

    which = jnp.searchsorted(jnp.asarray(buckets), jnp.sum(changing_B))
    return jax.lax.switch(which, [rows(size) for size in buckets])

  def reverse_step(self, key: Array, denoiser: base.Denoiser, x_t: Array,
                   t: Array, s: Array,
                   options: SamplingOptions = SamplingOptions()) -> Array:
    """One step t -> s; 'cached' calls the network only when a token
    unmasks (MDLM sec. 4.2's saving, exact for any network, since a step
    where nothing unmasks does not read the prediction)."""
    name = self.sampler(options)
    if name in masked_samplers.REMASKING:
      return masked_samplers.remdm_step(self, key, denoiser, x_t, t, s,
                                        options, name)
    if name in masked_samplers.SCORES:
      return masked_samplers.confidence_step(self, key, denoiser, x_t, t, s,
                                             options, name)
    return self._step(key, denoiser, x_t, t, s, options, name == "cached")

  def decode(self, denoiser: base.Denoiser, x0: Array,
             options: SamplingOptions = SamplingOptions()) -> Array:
    """Ids; any [MASK] left (only if the grid stops above 0) gets the mode."""
    del options  # the mode, whatever the sampler
    def fill(x):
      t = jnp.asarray(self.t_min, jnp.float32)
      x0_BxL = jnp.argmax(self.logits(denoiser, x, t), -1)
      return jnp.where(x == self.mask_id, x0_BxL, x).astype(jnp.int32)
    x0 = x0.astype(jnp.int32)
    return jax.lax.cond(jnp.any(x0 == self.mask_id), fill, lambda x: x, x0)


def fine_gumbel(u_a: Array, u_b: Array) -> Array:
  """Gumbel noise from two float32 uniforms on the 2^-23 grid.

  v = u_a + (u_b + 2^-24) 2^-23 is uniform on (0, 1) at 2^-46 resolution
  near 0, so E = -log1p(-v) ~ Exp(1) keeps its small values and the Gumbel
  -log E reaches ~31.9 instead of float32's ~16.6 (float64: ~36.7).
  """
  v = u_a + (u_b + 2.0 ** -24) * 2.0 ** -23
  return -jnp.log(-jnp.log1p(-jnp.minimum(v, 1.0 - 2.0 ** -24)))
