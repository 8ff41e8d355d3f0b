"""D3PM: discrete-time categorical diffusion with uniform or absorbing
transitions (Austin et al. 2021, "Structured Denoising Diffusion Models in
Discrete State-Spaces").

Forward (eq. 3): q(x_i | x_0) = Cat(x_0 Q-bar_i), Q-bar_i = Q(alpha_bar_i)
with alpha_bar_i = schedule.alpha(i / T) (closed forms in `transitions.py`;
the s -> t transition keeps a token with probability alpha(t) / alpha(s)).

Reverse, x0-parameterised (eq. 4, sec. 3.3): the network gives logits of
p~(x_0 | x_t) over the V data tokens and

    p(x_s | x_t) ∝ q(x_t | x_s) sum_x0 q(x_s | x0) p~(x0 | x_t),

used for every step including s = 0, where it reads
p(x_0 | x_1) ∝ q(x_1 | x_0) p~(x_0 | x_1). (The reference code uses p~
itself at t = 0; the form above is the same model at every step, so an exact
p~ for i.i.d. data makes the whole bound exact. For absorbing the two agree:
unmasked tokens are copied, masked ones drawn from p~.)

Bound (eq. 1): KL(q(x_T|x0) || p(x_T)) + sum_{i>=2} KL(q(x_{i-1}|x_i,x0) ||
p(x_{i-1}|x_i)) - log p(x0|x_1), with the sum over steps estimated by one
i ~ U{1..T} per sequence: T * L_i. Its value goes to the term
'reconstruction' when i = 1 and to 'diffusion' otherwise (each term is then
unbiased for its own part). Loss (eq. 5): L_vb + lambda * CE(x0 | x_t).

The graphs live in `d3pm_uniform.py` and `d3pm_absorbing.py`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from diffusion_text.processes import draws, transitions
from diffusion_text.processes.base import (Bound, Denoiser, LossOutput,
                                           ModelSpec, Process, SamplingOptions,
                                           make_bound, masked_sum, per_token)
from diffusion_text.processes.schedules import check_schedule, make_schedule

Array = jax.Array

# Floor for probabilities that are positive in exact arithmetic but may round
# to zero in float32 (keeps logs finite and gradients free of 0 * inf).
_TINY = 1e-30


def _expand(t: Array, x: Array) -> Array:
  """Times whose shape is a prefix of x's ([], [B], [B, L]) -> broadcastable."""
  t = jnp.asarray(t, jnp.float32)
  return t.reshape(t.shape + (1,) * (x.ndim - t.ndim))


def _lse_and_probs(logits_BxLxV: Array) -> tuple[Array, Array]:
  """(logsumexp, softmax) over the last axis from one exponential per entry."""
  max_BxL = jax.lax.stop_gradient(jnp.max(logits_BxLxV, axis=-1))
  exp_BxLxV = jnp.exp(logits_BxLxV - max_BxL[..., None])
  sum_BxL = jnp.sum(exp_BxLxV, axis=-1)
  return max_BxL + jnp.log(sum_BxL), exp_BxLxV / sum_BxL[..., None]


def _take(v_BxLxV: Array, ids_BxL: Array) -> Array:
  return jnp.take_along_axis(v_BxLxV, ids_BxL[..., None], axis=-1)[..., 0]


def _tempered(logits_BxLxV: Array, temperature: float) -> Array:
  """logits / temperature; at 0 a point mass on the argmax."""
  if temperature == 0.0:
    top_BxL = jnp.argmax(logits_BxLxV, axis=-1)
    onehot = jax.nn.one_hot(top_BxL, logits_BxLxV.shape[-1], dtype=bool)
    return jnp.where(onehot, 0.0, -jnp.inf)
  return logits_BxLxV / temperature


def _draw_where(key: Array, logits_BxLxV: Array, where_BxL: Array,
                float64: bool) -> Array:
  """Draws from softmax(logits) (already tempered) only where `where_BxL`
  (`draws.draw_where`: the few positions that change, no V-long cumsum)."""
  return draws.draw_where(key, logits_BxLxV, where_BxL,
                          SamplingOptions(float64=float64))


@dataclasses.dataclass(frozen=True)
class D3PM(Process):
  """Shared D3PM machinery; subclasses fix the transition family."""

  num_steps: int = 1000        # T; step i sits at time t_i = i / T
  schedule: str = "cosine_alpha"  # alpha_bar(t) by name (schedules.py)
  hybrid_lambda: float = 0.01  # weight of the auxiliary CE(x0 | x_t), eq. 5

  SAMPLERS = ("ancestral",)
  SAMPLING_KNOBS = ("temperature",)  # divides the x0-logits when sampling

  def __post_init__(self):
    check_schedule(self.schedule, process=type(self).__name__)

  # ---- family-specific pieces ------------------------------------------
  @property
  def transition(self) -> transitions.Transition:
    raise NotImplementedError

  def _step_term(self, logits_BxLxV, lse_BxL, probs_BxLxV, x_t, x0, a_s,
                 a_t) -> Array:
    """KL(q(x_s | x_t, x0) || p(x_s | x_t)) per position [B, L]; at s = 0
    (a_s = 1) this is -log p(x0 | x_t). lse, probs: `_lse_and_probs`."""
    raise NotImplementedError

  def _ce_positions(self, x_t: Array) -> Array:
    """Where the auxiliary CE(x0 | x_t) is taken (bool [B, L])."""
    raise NotImplementedError

  def _position_terms(self, denoiser, x_t, t_B, x0, a_s, a_t, weights):
    """(L(s, t), -log p~(x0 | x_t)) per position [B, L], the latter needed
    only at `_ce_positions`; each family computes them where they live.
    `weights`: the weight `loss` gives each of the two per position [B, L],
    up to one factor (a speed hint for the fused head, base.target_nll)."""
    raise NotImplementedError

  def _prior_kl(self, a_T: Array) -> Array:
    """KL(q(x_T | x0) || p(x_T)) per position (the same for every x0)."""
    raise NotImplementedError

  def _reverse_sample(self, key, logits_BxLxV, x_t, a_s, a_t, at_zero,
                      float64):
    raise NotImplementedError

  # ---- schedule ----------------------------------------------------------
  def alpha_bar(self, t: Array) -> Array:
    """Keep probability of q(x_t | x_0), clipped to [0, 1] (cosine dips
    just below 0 at t = 1 in float32)."""
    alpha = make_schedule(self.schedule).alpha(jnp.asarray(t, jnp.float32))
    return jnp.clip(alpha, 0.0, 1.0)

  def _keep_ratio(self, a_s: Array, a_t: Array) -> Array:
    return jnp.clip(a_t / jnp.maximum(a_s, _TINY), 0.0, 1.0)

  @property
  def model_spec(self) -> ModelSpec:
    return ModelSpec(input="tokens", output="logits",
                     output_dim=self.vocab_size,
                     input_vocab=self.transition.num_states)

  # ---- exact math (tested against dense matrices) ------------------------
  def marginal_probs(self, x0: Array, t: Array) -> Array:
    """q(x_t | x_0) -> [..., K]; t's shape is a prefix of x0's."""
    return self.transition.marginal(x0, self.alpha_bar(_expand(t, x0)))

  def posterior_probs(self, x_t: Array, x0: Array, s: Array,
                      t: Array) -> Array:
    """q(x_s | x_t, x_0) -> [..., K] for s < t, by Bayes' rule
    q(x_t | x_s) q(x_s | x0) / q(x_t | x0). All zeros when q(x_t | x0) = 0."""
    a_s = self.alpha_bar(_expand(s, x_t))
    a_t = self.alpha_bar(_expand(t, x_t))
    joint = (self.transition.column(x_t, self._keep_ratio(a_s, a_t))
             * self.transition.marginal(x0, a_s))
    return joint / jnp.maximum(joint.sum(-1, keepdims=True), _TINY)

  def p_theta_probs(self, logits_BxLxV: Array, x_t: Array, s: Array,
                    t: Array) -> Array:
    """p(x_s | x_t) ∝ q(x_t | x_s) sum_x0 q(x_s | x0) p~(x0 | x_t) -> [..., K]
    (dense over K; the bound and sampler use closed forms instead). All zeros
    where x_t cannot occur at time t."""
    a_s = self.alpha_bar(_expand(s, x_t))
    a_t = self.alpha_bar(_expand(t, x_t))
    p0 = jax.nn.softmax(logits_BxLxV.astype(jnp.float32), axis=-1)
    joint = (self.transition.column(x_t, self._keep_ratio(a_s, a_t))
             * self.transition.mix(p0, a_s))
    return joint / jnp.maximum(joint.sum(-1, keepdims=True), _TINY)

  def step_term(self, logits_BxLxV: Array, x_t: Array, x0: Array, s: Array,
                t: Array) -> Array:
    """Per-position L(s, t) = KL(q(x_s|x_t,x0) || p(x_s|x_t)) [B, L] in nats
    (-log p(x0 | x_t) at s = 0), in O(V) per position."""
    logits_BxLxV = logits_BxLxV.astype(jnp.float32)
    return self._step_term(logits_BxLxV, *_lse_and_probs(logits_BxLxV), x_t,
                           x0, self.alpha_bar(_expand(s, x_t)),
                           self.alpha_bar(_expand(t, x_t)))

  # ---- training ----------------------------------------------------------
  def sample_time(self, key: Array, batch: int) -> Array:
    """Stratified steps i in {1..T} (each marginally uniform) -> t = i / T."""
    u = (jax.random.uniform(key) + jnp.arange(batch) / batch) % 1.0
    i = jnp.clip(jnp.floor(u * self.num_steps) + 1, 1, self.num_steps)
    return i / self.num_steps

  def corrupt(self, key: Array, x0: Array, t: Array) -> Array:
    return self.transition.sample(key, x0, self.alpha_bar(_expand(t, x0)))

  def _estimate(self, key, denoiser, tokens, mask):
    """One-draw VLB terms [B] and the auxiliary CE summed per sequence [B]."""
    batch = tokens.shape[0]
    time_key, noise_key = jax.random.split(key)
    mask = mask.astype(bool)
    x0 = jnp.where(mask, tokens, 0).astype(jnp.int32)  # padding ids may be junk
    t_B = self.sample_time(time_key, batch)
    i_B = jnp.round(t_B * self.num_steps).astype(jnp.int32)
    s_B = (i_B - 1) / self.num_steps
    x_t = self.corrupt(noise_key, x0, t_B)
    a_s, a_t = self.alpha_bar(s_B[:, None]), self.alpha_bar(t_B[:, None])
    real = mask.astype(jnp.float32)
    weights = (self.num_steps * real, self.hybrid_lambda * real)
    step_BxL, nll_BxL = self._position_terms(denoiser, x_t, t_B, x0, a_s,
                                             a_t, weights)
    step_B = self.num_steps * masked_sum(step_BxL, mask)
    prior_B = masked_sum(
        jnp.broadcast_to(self._prior_kl(self.alpha_bar(1.0)), mask.shape), mask)
    first = i_B == 1
    terms = {"prior": prior_B,
             "diffusion": jnp.where(first, 0.0, step_B),
             "reconstruction": jnp.where(first, step_B, 0.0)}
    ce_B = masked_sum(jnp.where(self._ce_positions(x_t), nll_BxL, 0.0), mask)
    return terms, ce_B

  def nll_bound(self, key: Array, denoiser: Denoiser, tokens: Array,
                mask: Array) -> Bound:
    terms, _ = self._estimate(key, denoiser, tokens, mask)
    return make_bound(terms)

  def loss(self, key: Array, denoiser: Denoiser, tokens: Array,
           mask: Array) -> LossOutput:
    """L_vb (nats/token) + hybrid_lambda * CE(x0 | x_t) (nats/real token)."""
    terms, ce_B = self._estimate(key, denoiser, tokens, mask)
    bound = make_bound(terms)
    nll = per_token(bound.nats, mask)
    ce = per_token(ce_B, mask)
    loss = nll + self.hybrid_lambda * ce
    metrics = {"loss": loss, "nll_bound": nll, "ce": ce}
    metrics.update({k: per_token(v, mask) for k, v in terms.items()})
    return LossOutput(loss, metrics, bound.terms)

  # ---- sampling ----------------------------------------------------------
  def reverse_step(self, key: Array, denoiser: Denoiser, x_t: Array,
                   t: Array, s: Array,
                   options: SamplingOptions = SamplingOptions()) -> Array:
    """Ancestral step t -> s < t on any grid; s = 0 yields clean tokens
    (temperature 0: the mode of p~(x0 | x_t))."""
    self.sampler(options)  # validates the name and knobs
    t_B = jnp.full((x_t.shape[0],), t, jnp.float32)
    logits_BxLxV = denoiser.predict(x_t, t_B).astype(jnp.float32)
    logits_BxLxV = _tempered(logits_BxLxV, options.temperature)
    return self._reverse_sample(key, logits_BxLxV, x_t, self.alpha_bar(s),
                                self.alpha_bar(t), jnp.asarray(s) <= 0.0,
                                options.float64)

  def decode(self, denoiser: Denoiser, x0: Array,
             options: SamplingOptions = SamplingOptions()) -> Array:
    del denoiser, options
    return x0.astype(jnp.int32)
