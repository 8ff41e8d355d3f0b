"""The `Process` contract shared by every diffusion family and the AR baseline.

A process is a frozen, hashable dataclass holding only hyper-parameters. It
never owns parameters and never imports Flax: the network reaches it as a
`Denoiser`, a bundle of plain callables already bound to parameters.

Conventions (DESIGN.md section 2):
  * time is continuous, t in (0, 1]; a T-step process uses t_i = i / T;
  * tokens are int32 [B, L]; `mask` [B, L] marks real (non-padding) positions;
  * every likelihood figure is in nats; `nll_bound` returns per-sequence sums
    (divide by mask.sum(-1) for nats per token).
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, ClassVar, NamedTuple, Optional

import jax
import jax.numpy as jnp

from diffusion_text.contract import Denoiser, ModelSpec, cross_entropy
from diffusion_text.processes import conditioning
from diffusion_text.processes.draws import nucleus  # noqa: F401 (re-export)

Array = jax.Array


class Bound(NamedTuple):
  """Per-sequence upper bound on -log p(tokens), in nats.

  nats: [B] the bound (the sum of `terms`); terms: named [B] parts, e.g.
  'prior', 'diffusion', 'reconstruction' (the AR baseline: 'nll').
  """

  nats: Array
  terms: dict[str, Array]


class LossOutput(NamedTuple):
  """loss: scalar objective to minimise; metrics: scalars for logging;
  terms: the per-sequence [B] NLL-bound terms (nats) this loss estimated."""

  loss: Array
  metrics: dict[str, Array]
  terms: dict[str, Array]


def make_bound(terms: dict[str, Array]) -> Bound:
  total = sum(terms.values())
  return Bound(nats=total, terms=dict(terms))


def masked_sum(x_BxL: Array, mask_BxL: Array) -> Array:
  """Sum over the sequence axis of the real positions -> [B]."""
  return jnp.sum(jnp.where(mask_BxL.astype(bool), x_BxL, 0.0), axis=-1)


def target_nll(denoiser: Denoiser, x_t: Array, t_B: Array,
               target_BxL: Array, where_BxL: Array,
               weights: Optional[Array] = None) -> Array:
  """-log p(target | x_t) [B, L] per position, needed only where `where`.

  A backbone that offers `Denoiser.target_nll` evaluates its head and
  softmax only at the selected positions, fused (DESIGN.md section 8); any
  other denoiser falls back to logsumexp minus the target logit over all
  positions (no [B, L, V] log-probabilities either way). Values off `where`
  are arbitrary. `weights` [B, L] (optional, a speed hint): the weight the
  caller's loss gives each position's value, up to one common factor; the
  fused head then forms its gradient in the forward pass (exact whatever is
  passed: a wrong hint costs a recomputation, never accuracy; see
  `models.folded` for the warning).
  """
  if denoiser.target_nll is not None:
    return denoiser.target_nll(x_t, t_B, target_BxL, where_BxL,
                               weights=weights)
  return cross_entropy(denoiser.predict(x_t, t_B), target_BxL)


def target_lse(denoiser: Denoiser, x_t: Array, t_B: Array,
               target_BxL: Array, where_BxL: Array,
               classes: Optional[int] = None,
               weights: Optional[tuple[Array, Array]] = None
               ) -> tuple[Array, Array]:
  """(-log p(target | x_t), logsumexp of the logits) [B, L] over the first
  `classes` outputs, needed only where `where` (fused when the backbone
  offers `Denoiser.target_lse`; values off `where` are arbitrary).
  `weights`: the two's loss weights, as for `target_nll`."""
  if denoiser.target_lse is not None:
    return denoiser.target_lse(x_t, t_B, target_BxL, where_BxL, classes,
                               weights=weights)
  logits_BxLxV = denoiser.predict(x_t, t_B)[..., :classes]
  return (cross_entropy(logits_BxLxV, target_BxL),
          jax.nn.logsumexp(logits_BxLxV.astype(jnp.float32), axis=-1))


def map_logits(denoiser: Denoiser, x_t: Array, t_B: Array, fn, rows,
               weights=None, chunk=None, **predict_kwargs):
  """fn(logits [N, V], rows [N, ...]) per position, as pytrees of [B, L, ...].

  For losses that need vocabulary-sized sums at every position (uniform
  D3PM and SEDD, Gaussian x0-hat): a backbone that offers
  `Denoiser.map_logits` runs its head and `fn` a chunk of positions at a
  time (no [B, L, V] array in either pass); otherwise `fn` sees the dense
  logits of `predict`. `fn` must act row by row. `weights` (optional, a
  speed hint like `target_nll`'s): a pytree like fn's output of [B, L, ...]
  arrays, the weight the caller's loss gives each output, up to one factor.
  `chunk`: positions per chunk (default `contract.ROW_CHUNK`; a speed knob).
  """
  if denoiser.map_logits is not None:
    return denoiser.map_logits(x_t, t_B, fn, rows, weights=weights,
                               chunk=chunk, **predict_kwargs)
  logits_BxLxV = denoiser.predict(x_t, t_B, **predict_kwargs)
  b, length, vocab = logits_BxLxV.shape
  flat = lambda a: a.reshape(b * length, *a.shape[2:])
  out = fn(flat(logits_BxLxV.astype(jnp.float32)), jax.tree.map(flat, rows))
  return jax.tree.map(lambda a: a.reshape(b, length, *a.shape[1:]), out)


def bound_as_loss(bound: Bound, mask_BxL: Array) -> LossOutput:
  """The training objective of processes trained on their bound itself
  (masked, SEDD, continuous-time Gaussian): the bound per token."""
  nats = per_token(bound.nats, mask_BxL)
  metrics = {"loss": nats, "nll_bound": nats}
  metrics.update({k: per_token(v, mask_BxL) for k, v in bound.terms.items()})
  return LossOutput(loss=nats, metrics=metrics, terms=bound.terms)


def per_token(nats_B: Array, mask_BxL: Array) -> Array:
  """Batch nats per token: total nats over total real tokens (a scalar)."""
  return jnp.sum(nats_B) / jnp.maximum(jnp.sum(mask_BxL), 1)


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
  """How to sample, apart from what defines the model and its bound.

  sampler: a variant from the process's `sampler_names()`; "default" is the
      process's usual sampler (the first name).
  temperature: divides the logits of the sampled distribution (0: argmax),
      or for the continuous-time Gaussian process the score (PLAID).
  top_p: nucleus mass kept when drawing tokens (1: off).
  top_k: keep only the k most likely tokens when drawing (0: off).
  float64: categorical draws at float64 resolution (draws.py); False draws
      with one float32 inverse CDF.
  remask_eta: eta of the ReMDM remasking samplers (the cap, or the share
      of sigma_max); read by those samplers only.
  remask_t_on, remask_t_off, remask_alpha_on: ReMDM-loop's window on the
      sampler's clock and the keep probability held inside it (the paper's
      0.55, 0.05, 0.9); read by "remdm_loop" only.
  block_length: semi-autoregressive sampling (0: off): the sequence is
      generated in blocks of this many positions, left to right, each over
      an equal share of the steps (LLaDA sec. 2.4; for long outputs).
  """

  sampler: str = "default"
  temperature: float = 1.0
  top_p: float = 1.0
  top_k: int = 0
  float64: bool = True
  block_length: int = 0
  remask_eta: float = 0.02
  remask_t_on: float = 0.55
  remask_t_off: float = 0.05
  remask_alpha_on: float = 0.9

  def __post_init__(self):
    if self.temperature < 0:
      raise ValueError(f"temperature must be >= 0, got {self.temperature}")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
    if self.top_k < 0:
      raise ValueError(f"top_k must be >= 0 (0: off), got {self.top_k}")
    if not 0.0 <= self.remask_eta <= 1.0:
      raise ValueError(f"remask_eta must be in [0, 1], got {self.remask_eta}")
    if not 0.0 < self.remask_t_off < self.remask_t_on < 1.0:
      raise ValueError(
          f"ReMDM-loop needs 0 < remask_t_off < remask_t_on < 1, got "
          f"t_off={self.remask_t_off}, t_on={self.remask_t_on}")
    if not 0.0 < self.remask_alpha_on < 1.0:
      raise ValueError(f"remask_alpha_on must be in (0, 1), got "
                       f"{self.remask_alpha_on}")
    if self.block_length < 0:
      raise ValueError(f"block_length must be >= 0 (0: off), got "
                       f"{self.block_length}")


@dataclasses.dataclass(frozen=True)
class Process(abc.ABC):
  """Abstract base: every family implements these methods."""

  vocab_size: int
  # Chance a training sequence gets a random clean span as conditioning,
  # left out of the loss (conditioning.py); > 0 makes `condition` impose
  # clean values at every noise level, as in training.
  train_conditioning: float = 0.0

  # ---- what the backbone must look like --------------------------------
  @property
  @abc.abstractmethod
  def model_spec(self) -> ModelSpec:
    ...

  # ---- training ---------------------------------------------------------
  @abc.abstractmethod
  def sample_time(self, key: Array, batch: int) -> Array:
    """Training times t [batch] in (0, 1]."""

  @abc.abstractmethod
  def corrupt(self, key: Array, x0: Array, t: Array) -> Array:
    """Draw x_t ~ q(x_t | x_0). x0: [B, L] ids (or [B, L, D] latents); t: [B]."""

  @abc.abstractmethod
  def loss(self, key: Array, denoiser: Denoiser, tokens: Array,
           mask: Array) -> LossOutput:
    """Scalar training objective, metrics and per-sequence bound terms."""

  @abc.abstractmethod
  def nll_bound(self, key: Array, denoiser: Denoiser, tokens: Array,
                mask: Array) -> Bound:
    """Per-sequence (Monte-Carlo unbiased) upper bound on -log p(tokens)."""

  # ---- sampling ---------------------------------------------------------
  @abc.abstractmethod
  def prior(self, key: Array, shape: tuple[int, int]) -> Array:
    """x_T for a batch of `shape` = (B, L) sequences."""

  @abc.abstractmethod
  def reverse_step(self, key: Array, denoiser: Denoiser, x_t: Array,
                   t: Array, s: Array,
                   options: SamplingOptions = SamplingOptions()) -> Array:
    """One reverse step from time t to s < t (scalars)."""

  @abc.abstractmethod
  def decode(self, denoiser: Denoiser, x0: Array,
             options: SamplingOptions = SamplingOptions()) -> Array:
    """Final state -> token ids int32 [B, L]."""

  # Sampler variants by name, the default first; processes override.
  SAMPLERS: ClassVar[tuple[str, ...]] = ("ancestral",)
  # Which SamplingOptions knobs the samplers honour (others must stay 1.0).
  SAMPLING_KNOBS: ClassVar[tuple[str, ...]] = ()

  def sampler_names(self) -> tuple[str, ...]:
    """The valid `SamplingOptions.sampler` values besides "default"."""
    return self.SAMPLERS

  def sampler(self, options: SamplingOptions) -> str:
    """The variant `options` selects, checked against `sampler_names()` and
    the knobs this process honours."""
    names = self.sampler_names()
    name = names[0] if options.sampler == "default" else options.sampler
    if name not in names:
      raise ValueError(
          f"unknown sampler {options.sampler!r} for {type(self).__name__}; "
          f"choose one of: default, {', '.join(names)}")
    for knob, off in (("temperature", 1.0), ("top_p", 1.0), ("top_k", 0),
                      ("block_length", 0)):
      if knob not in self.SAMPLING_KNOBS and getattr(options, knob) != off:
        raise ValueError(
            f"{type(self).__name__} samplers do not support {knob}; leave "
            f"it at {off} (supported: "
            f"{', '.join(self.SAMPLING_KNOBS) or 'none'})")
    return name

  # Sampler-state protocol used by `diffusion_text.sampling`: a sampler that
  # carries state between steps (the cached masked sampler, self-conditioning)
  # overrides both; the default carries nothing.
  def init_sampler_state(self, x_T: Array,
                         options: SamplingOptions = SamplingOptions()):
    del x_T, options
    return ()

  def reverse_step_with_state(self, key: Array, denoiser: Denoiser,
                              x_t: Array, t: Array, s: Array, state,
                              options: SamplingOptions = SamplingOptions()):
    return self.reverse_step(key, denoiser, x_t, t, s, options), state

  def time_grid(self, steps: int, length: int,
                options: SamplingOptions = SamplingOptions()) -> Array:
    """Times t_0 = 1 > t_1 > ... > t_steps = 0 visited by the sampler."""
    del length, options
    return jnp.linspace(1.0, 0.0, steps + 1)

  def num_sampling_steps(self, requested: Optional[int], length: int,
                         options: SamplingOptions = SamplingOptions()) -> int:
    """The number of reverse steps the sampler runs (default: as requested)."""
    del length, options
    if requested is None:
      return getattr(self, "num_steps", None) or 128
    return requested

  # ---- conditioning: fix some positions, let the process fill the rest ---
  # How `impose` fills conditioned positions at t > 0: False keeps the clean
  # token, exact for absorbing noise (an unmasked token of x_t *is* x0) and
  # the AR baseline; True draws from q(x_t | tokens) via `corrupt`, the state
  # the forward process is in at t (uniform noise: a clean token at high
  # noise is not one).
  IMPOSE_DRAWS: ClassVar[bool] = False
  # Whether `train_conditioning` applies (not to the AR baseline).
  TRAIN_CONDITIONING: ClassVar[bool] = True

  def impose(self, key: Array, denoiser: Denoiser, x_t: Array, t: Array,
             tokens: Array, cond_mask: Array) -> Array:
    """Return x_t with the positions in `cond_mask` set to their values under
    q(x_t | tokens) (see `IMPOSE_DRAWS`); clean at t <= 0."""
    del denoiser
    known = tokens
    if self.IMPOSE_DRAWS:
      t_B = jnp.full(tokens.shape[:1], t, jnp.float32)
      known = jnp.where(t > 0, self.corrupt(key, tokens, t_B), tokens)
    return jnp.where(cond_mask.astype(bool), known, x_t)

  def clean_state(self, denoiser: Denoiser, tokens: Array) -> Array:
    """x_0 as the network sees it: ids, or latents for the Gaussian ones."""
    del denoiser
    return tokens

  def condition(self, key: Array, denoiser: Denoiser, x_t: Array, t: Array,
                tokens: Array, cond_mask: Array) -> Array:
    """The sampler's conditioning: clean states for a model trained with
    `train_conditioning`, else `impose` (replacement)."""
    if self.train_conditioning > 0:
      return conditioning.with_clean(x_t, self.clean_state(denoiser, tokens),
                                     cond_mask.astype(bool))
    return self.impose(key, denoiser, x_t, t, tokens, cond_mask)

  def train_loss(self, key: Array, denoiser: Denoiser, tokens: Array,
                 mask: Array) -> LossOutput:
    """`loss`, or with `train_conditioning` > 0 the loss of the free
    positions given a random clean span (conditioning.py)."""
    if self.train_conditioning == 0:
      return self.loss(key, denoiser, tokens, mask)
    if not self.TRAIN_CONDITIONING or not 0 < self.train_conditioning < 1:
      raise ValueError(
          f"train_conditioning={self.train_conditioning} for "
          f"{type(self).__name__}: use a rate in [0, 1)"
          + ("" if self.TRAIN_CONDITIONING else
             " (0 here: its prefix conditioning is already exact)"))
    span_key, loss_key = jax.random.split(key)
    cond_BxL = conditioning.random_spans(span_key, tokens.shape,
                                         self.train_conditioning)
    clean = self.clean_state(denoiser, tokens)
    wrapped = conditioning.clean_input_denoiser(denoiser, clean, cond_BxL)
    return self.loss(loss_key, wrapped, tokens,
                     mask.astype(bool) & ~cond_BxL)

  # ---- helpers -----------------------------------------------------------
  def options(self) -> dict[str, Any]:
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
