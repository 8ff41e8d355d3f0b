"""Autoregressive baseline on the shared backbone (causal attention).

-log p(x) = sum_i -log p(x_i | x_<i) (the chain rule, e.g. Bengio et al.
2003 eq. 1): an exact NLL, so its "bound" has a single term 'nll' and no
Monte-Carlo error. The network reads [BOS, x_0, ..., x_{L-2}] (BOS id =
vocab_size, added here) and predicts x_0 ... x_{L-1} at every position at
once; time is unused and fed as t = 0.

Sampling runs through the generic `Process` API: the time grid has L + 1
points and the step from t to s fills position round((1 - t) L), left to
right, with one random number per sequence (inverse-CDF sampling), so
clamping positions with the default `impose` gives prefix prompting.

Padding is assumed to follow the real tokens (right padding): a causal
model never looks at later positions, so masked positions change nothing.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

from diffusion_text.contract import cross_entropy
from diffusion_text.processes import base, draws
from diffusion_text.processes.base import (Bound, Denoiser, LossOutput,
                                           ModelSpec, Process, SamplingOptions,
                                           make_bound, masked_sum, per_token)

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Autoregressive(Process):
  """Next-token prediction; `SamplingOptions.temperature` (0: greedy) and
  `top_p` (nucleus sampling, Holtzman et al. 2020) shape the sampler."""

  SAMPLERS = ("ancestral",)
  SAMPLING_KNOBS = ("temperature", "top_k", "top_p")
  TRAIN_CONDITIONING = False  # prefixes are exact; inputs are shifted

  @property
  def bos_id(self) -> int:
    return self.vocab_size

  @property
  def model_spec(self) -> ModelSpec:
    return ModelSpec(input="tokens", output="logits",
                     output_dim=self.vocab_size,
                     input_vocab=self.vocab_size + 1, causal=True)

  # ---------------------------------------------------------------- training
  def sample_time(self, key: Array, batch: int) -> Array:
    del key
    return jnp.zeros((batch,), jnp.float32)

  def corrupt(self, key: Array, x0: Array, t: Array) -> Array:
    """The network input: tokens shifted right behind BOS."""
    del key, t
    bos_Bx1 = jnp.full((x0.shape[0], 1), self.bos_id, x0.dtype)
    return jnp.concatenate([bos_Bx1, x0[:, :-1]], axis=1)

  def _logits(self, denoiser: Denoiser, tokens_BxL: Array) -> Array:
    inputs_BxL = self.corrupt(None, tokens_BxL, None)
    t_B = jnp.zeros((tokens_BxL.shape[0],), jnp.float32)
    return denoiser.predict(inputs_BxL, t_B).astype(jnp.float32)

  def token_nll(self, denoiser: Denoiser, tokens: Array) -> Array:
    """-log p(x_i | x_<i) [B, L] as logsumexp minus the target logit."""
    return cross_entropy(self._logits(denoiser, tokens), tokens)

  def nll_bound(self, key: Array, denoiser: Denoiser, tokens: Array,
                mask: Array) -> Bound:
    """The exact per-sequence NLL (nats), over the real positions."""
    del key
    # Same as token_nll, with the head fused with its softmax where the
    # backbone offers it (base.target_nll; DESIGN.md section 8).
    real_BxL = mask.astype(bool)
    nll_BxL = base.target_nll(
        denoiser, self.corrupt(None, tokens, None),
        jnp.zeros((tokens.shape[0],), jnp.float32),
        tokens.astype(jnp.int32), real_BxL, weights=jnp.ones(real_BxL.shape))
    return make_bound({"nll": masked_sum(nll_BxL, real_BxL)})

  def loss(self, key: Array, denoiser: Denoiser, tokens: Array,
           mask: Array) -> LossOutput:
    bound = self.nll_bound(key, denoiser, tokens, mask)
    nats_per_token = per_token(bound.nats, mask)
    return LossOutput(loss=nats_per_token,
                      metrics={"loss": nats_per_token,
                               "nll_bound": nats_per_token},
                      terms=bound.terms)

  # ---------------------------------------------------------------- sampling
  def num_sampling_steps(self, requested: Optional[int], length: int,
                         options: SamplingOptions = SamplingOptions()) -> int:
    """One step per position, whatever was requested."""
    del requested, options
    return length

  def time_grid(self, steps: int, length: int,
                options: SamplingOptions = SamplingOptions()) -> Array:
    """t_i = 1 - i / L, i = 0..L: the step from t_i fills position i."""
    del steps, options
    return 1.0 - jnp.arange(length + 1, dtype=jnp.float32) / length

  def prior(self, key: Array, shape: tuple[int, int]) -> Array:
    del key
    return jnp.zeros(shape, jnp.int32)

  def reverse_step(self, key: Array, denoiser: Denoiser, x_t: Array,
                   t: Array, s: Array,
                   options: SamplingOptions = SamplingOptions()) -> Array:
    """Sample position round((1 - t) L) given the prefix before it."""
    del s
    self.sampler(options)  # validates the name and knobs
    length = x_t.shape[1]
    pos = jnp.clip(jnp.round((1.0 - t) * length).astype(jnp.int32),
                   0, length - 1)
    logits_BxLxV = self._logits(denoiser, x_t)
    logits_BxV = jax.lax.dynamic_index_in_dim(logits_BxLxV, pos, axis=1,
                                              keepdims=False)
    token_B = self.sample_logits(key, logits_BxV, options)
    at_pos_L = jnp.arange(length) == pos
    return jnp.where(at_pos_L[None, :], token_B[:, None].astype(x_t.dtype),
                     x_t)

  def sample_logits(self, key: Array, logits_BxV: Array,
                    options: SamplingOptions = SamplingOptions()) -> Array:
    """One draw per row with temperature, top-k and nucleus truncation:
    one inverse CDF per row, not one Gumbel per class (draws.py)."""
    return draws.draw(key, logits_BxV, options)

  def decode(self, denoiser: Denoiser, x0: Array,
             options: SamplingOptions = SamplingOptions()) -> Array:
    del denoiser, options
    return x0
