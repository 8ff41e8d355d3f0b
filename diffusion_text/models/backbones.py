"""Backbones by name, and how each one meets a process's `Denoiser` contract.

  name       module                  config (`arch`)         processes
  dit        denoiser.Transformer    config.ModelConfig      every process
  gpt2       gpt2.GPT2               gpt2.GPT2Config         ar
  sedd_dit   dit_sedd.ScoreDiT       dit_sedd.DiTConfig      sedd_absorb, sedd_uniform
  mdlm_dit   dit_sedd.ScoreDiT       dit_sedd.DiTConfig      masked

How the published models' outputs map onto our processes' `predict`:

* gpt2 -> ar. GPT-2 returns next-token logits over its V ids, which is what
  `Autoregressive` expects; the process prepends its own BOS id (= V, one
  past GPT-2's table), which the adapter rewrites to GPT-2's
  <|endoftext|> (`GPT2Config.bos_token`), the token GPT-2 was trained to
  continue from. Time is unused.
* sedd_dit -> sedd_absorb / sedd_uniform. The published `SEDD.forward`
  returns the log concrete score: raw logits, minus log(e^sigma - 1) +
  log(V) for absorb (`scale_by_sigma`), then 0 at the input token
  (`dit_sedd.sedd_log_score`). Our processes take the RAW logits from
  `predict` and apply that post-processing themselves
  (`SEDDAbsorb.log_score`: log s_hat = raw - log V, which is the published
  log-score plus log(e^sigma - 1) = minus log(alpha / (1 - alpha)), the
  finite form the bound uses; the input-token entry is the dropped [MASK]
  column at masked positions and never used at unmasked ones.
  `SEDDUniform.log_score` zeroes the input-token entry). The network reads
  the total noise sigma_bar(t), not t: the backbone asks for
  `ModelSpec.time_input == 'total_noise'` and the SEDD processes (option
  `time_input=total_noise`) then call `predict(x_t, sigma_bar(t))`.
* mdlm_dit -> masked. MDLM's backbone returns raw logits over V + 1 ids
  ([MASK] last). Its SUBS parameterisation (`dit_sedd.mdlm_subs_log_probs`)
  is: -inf on [MASK] before the softmax (zero masking), and unmasked
  tokens copied (carry-over). `MaskedProcess` expects logits over the V
  data tokens only and applies carry-over itself (it scores and updates
  masked positions only), so the adapter drops the [MASK] column: a
  softmax over the first V columns equals MDLM's (e^-1e6 is 0 in float32).
  The network reads sigma(t) = -log alpha(t) through a plain `time_fn`
  (built from the process's schedule above this package, in
  `diffusion_text.binding`); with `time_conditioning` false (the published
  mdlm-owt) it ignores it, as the process's `time_conditioning=False`
  assumes.

Nothing here knows a process: `Adapted` holds a published module with the
`ModelSpec` it serves and a `time_fn` callable, and `models.as_denoiser`
turns it into the `Denoiser` through the registry's adapter.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from diffusion_text.contract import Denoiser, ModelSpec
from diffusion_text.models.dit_sedd import DiTConfig, ScoreDiT
from diffusion_text.models.gpt2 import GPT2, GPT2Config

Array = jax.Array
TimeFn = Callable[[Array], Array]  # process time t [B] -> network input [B]

# MDLM-owt was trained with a log-linear schedule, alpha(1) = 1e-3: the
# largest sigma it has seen is -log(1e-3); larger noise levels are clipped.
MDLM_MIN_ALPHA = 1e-3


def gpt2_denoiser(model: GPT2, bos_id: int) -> Denoiser:
  """`predict(x, t)` = GPT-2 logits, with our BOS id `bos_id` read as
  GPT-2's <|endoftext|>; t is ignored."""
  def predict(x_BxL: Array, t_B: Array, self_cond=None) -> Array:
    del t_B, self_cond
    ids_BxL = jnp.where(x_BxL == bos_id, model.cfg.bos_token, x_BxL)
    return model(ids_BxL)
  return Denoiser(predict=predict)


def sedd_denoiser(model: ScoreDiT, time_fn: TimeFn) -> Denoiser:
  """`predict(x, t)` = raw DiT logits [B, L, K] at sigma = time_fn(t)
  (the SEDD processes already pass sigma_bar(t): time_fn is the identity)."""
  def predict(x_BxL: Array, t_B: Array, self_cond=None) -> Array:
    del self_cond
    return model(x_BxL, time_fn(jnp.asarray(t_B, jnp.float32)))
  return Denoiser(predict=predict)


def mdlm_denoiser(model: ScoreDiT, time_fn: TimeFn) -> Denoiser:
  """`predict(x, t)` = MDLM logits over the V data tokens ([MASK], the last
  column, dropped: zero masking) at sigma = time_fn(t)."""
  data_vocab = model.cfg.vocab_size - 1

  def predict(x_BxL: Array, t_B: Array, self_cond=None) -> Array:
    del self_cond
    sigma_B = time_fn(jnp.asarray(t_B, jnp.float32))
    return model(x_BxL, sigma_B)[..., :data_vocab]
  return Denoiser(predict=predict)


def identity_time(t_B: Array) -> Array:
  return t_B


# ------------------------------------------------------------- registry
@dataclasses.dataclass(frozen=True)
class Backbone:
  """A published backbone: module(arch, rngs=) built from `arch_cls(**d)`;
  adapt(module, time_fn, spec) -> Denoiser; input_rows(arch) -> embedding
  rows (checked against `spec.input_vocab`); time_input: what the process
  must feed `predict` (`ModelSpec.time_input`)."""

  module: Callable[..., nnx.Module]
  arch_cls: type
  adapt: Callable[[nnx.Module, TimeFn, ModelSpec], Denoiser]
  input_rows: Callable[[Any], int]
  time_input: str = "t"


BACKBONES: dict[str, Backbone] = {
    # Our BOS (= V, the last input row) is not a row of GPT-2's table; the
    # adapter rewrites it.
    "gpt2": Backbone(
        module=GPT2, arch_cls=GPT2Config,
        adapt=lambda m, time_fn, spec: gpt2_denoiser(
            m, bos_id=spec.input_vocab - 1),
        input_rows=lambda arch: arch.vocab_size + 1),
    "sedd_dit": Backbone(
        module=ScoreDiT, arch_cls=DiTConfig,
        adapt=lambda m, time_fn, spec: sedd_denoiser(m, time_fn),
        input_rows=lambda arch: arch.vocab_size, time_input="total_noise"),
    "mdlm_dit": Backbone(
        module=ScoreDiT, arch_cls=DiTConfig,
        adapt=lambda m, time_fn, spec: mdlm_denoiser(m, time_fn),
        input_rows=lambda arch: arch.vocab_size),
}


def backbone(name: str) -> Backbone:
  if name not in BACKBONES:
    raise ValueError(f"unknown model.backbone {name!r}; choose one of: "
                     f"dit, {', '.join(BACKBONES)}")
  return BACKBONES[name]


def make_arch(name: str, arch: Any) -> Any:
  """The backbone's config from a dict (config.json) or the config itself."""
  cls = backbone(name).arch_cls
  if isinstance(arch, cls):
    return arch
  try:
    return cls(**dict(arch))
  except TypeError as e:
    raise ValueError(f"model.arch does not describe a {name!r} backbone "
                     f"({e}); import the checkpoint again") from None


class Adapted(nnx.Module):
  """A published backbone and what its adapter needs: the `ModelSpec` it
  serves and the plain `time_fn` mapping process time to its input."""

  def __init__(self, name: str, inner: nnx.Module, spec: ModelSpec,
               time_fn: TimeFn = identity_time):
    self.name, self.inner, self.spec, self.time_fn = name, inner, spec, time_fn

  def adapted_denoiser(self) -> Denoiser:
    return backbone(self.name).adapt(self.inner, self.time_fn, self.spec)


def build_adapted(name: str, arch: Any, spec: ModelSpec, time_fn: TimeFn,
                  seed: int = 0) -> Adapted:
  """A freshly initialised backbone `name` wrapped for `spec`."""
  inner = backbone(name).module(make_arch(name, arch),
                                rngs=nnx.Rngs(params=seed))
  return Adapted(name, inner, spec, time_fn)


__all__ = ["Adapted", "BACKBONES", "Backbone", "MDLM_MIN_ALPHA", "TimeFn",
           "backbone", "build_adapted", "gpt2_denoiser", "identity_time",
           "make_arch", "mdlm_denoiser", "sedd_denoiser"]
