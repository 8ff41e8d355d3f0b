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
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Denoiser:
  """The network as the process sees it: callables bound to parameters.

  predict(x_t, t, self_cond=None) -> output
      x_t: int32 [B, L] token ids (token stem) or float [B, L, D] latents;
      t: float [B] in [0, 1]; output: logits [B, L, V_out] or a vector
      [B, L, D] (see `ModelSpec.output`).
  embed(ids [B, L]) -> [B, L, D]: learned token embeddings (Gaussian only).
  round_logits(x [B, L, D]) -> [B, L, V]: logits of p(w | x) (Gaussian only).
  gamma(t [B]) -> [B]: a learned noise schedule gamma(t) = -log SNR(t),
      monotone increasing in t (only with `ModelSpec.learned_schedule`).
  target_nll(x_t, t [B], target [B, L], where [B, L]) -> [B, L]: optional
      fused -log softmax(predict(x_t, t))[target] evaluated only where
      `where` holds (values elsewhere arbitrary); see `target_nll` below.
  """

  predict: Callable[..., Array]
  embed: Optional[Callable[[Array], Array]] = None
  round_logits: Optional[Callable[[Array], Array]] = None
  gamma: Optional[Callable[[Array], Array]] = None
  target_nll: Optional[Callable[..., Array]] = None


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """What a process needs from the backbone; the model builder reads it.

  input: 'tokens' (embedding stem over `input_vocab` ids) or 'latents'
      (a projection stem over `latent_dim`-dimensional vectors).
  output: 'logits' (a head over `output_dim` classes) or 'vector' (a head
      of size `output_dim` in latent space).
  embed_vocab: size of a learned token-embedding table of width `latent_dim`
      exposed as `Denoiser.embed` / `round_logits` (Gaussian processes).
  causal: causal attention (the AR baseline).
  self_conditioning: `predict` accepts a `self_cond` input of the same shape
      as its latent input.
  learned_schedule: the model carries a monotone network gamma(t) = -log SNR
      exposed as `Denoiser.gamma`, initialised to the line from
      gamma_range[0] (t=0) to gamma_range[1] (t=1) (Kingma et al. 2021 sec. 5).
  """

  input: str
  output: str
  output_dim: int
  input_vocab: Optional[int] = None
  latent_dim: Optional[int] = None
  embed_vocab: Optional[int] = None
  causal: bool = False
  self_conditioning: bool = False
  learned_schedule: bool = False
  gamma_range: tuple[float, float] = (-10.0, 10.0)


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
               target_BxL: Array, where_BxL: Array) -> Array:
  """-log p(target | x_t) [B, L] per position, needed only where `where`.

  A backbone that offers `Denoiser.target_nll` evaluates its head and
  softmax only at the selected positions, fused (DESIGN.md section 8); any
  other denoiser falls back to logsumexp minus the target logit over all
  positions (no [B, L, V] log-probabilities either way). Values off `where`
  are arbitrary.
  """
  if denoiser.target_nll is not None:
    return denoiser.target_nll(x_t, t_B, target_BxL, where_BxL)
  logits_BxLxV = denoiser.predict(x_t, t_B).astype(jnp.float32)
  tgt_BxL = jnp.take_along_axis(logits_BxLxV, target_BxL[..., None], -1)[..., 0]
  return jax.nn.logsumexp(logits_BxLxV, axis=-1) - tgt_BxL


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
class Process(abc.ABC):
  """Abstract base: every family implements these methods."""

  vocab_size: int

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
                   t: Array, s: Array) -> Array:
    """One reverse step from time t to s < t (scalars)."""

  @abc.abstractmethod
  def decode(self, denoiser: Denoiser, x0: Array) -> Array:
    """Final state -> token ids int32 [B, L]."""

  def time_grid(self, steps: int, length: int) -> Array:
    """Times t_0 = 1 > t_1 > ... > t_steps = 0 visited by the sampler."""
    del length
    return jnp.linspace(1.0, 0.0, steps + 1)

  def num_sampling_steps(self, requested: Optional[int], length: int) -> int:
    """The number of reverse steps the sampler runs (default: as requested)."""
    del length
    if requested is None:
      return getattr(self, "num_steps", None) or 128
    return requested

  # ---- conditioning: fix some positions, let the process fill the rest ---
  def impose(self, key: Array, denoiser: Denoiser, x_t: Array, t: Array,
             tokens: Array, cond_mask: Array) -> Array:
    """Return x_t with the positions in `cond_mask` set to their values under
    q(x_t | tokens) (for token states: the clean token itself)."""
    del key, denoiser, t
    return jnp.where(cond_mask.astype(bool), tokens, x_t)

  # ---- helpers -----------------------------------------------------------
  def options(self) -> dict[str, Any]:
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
