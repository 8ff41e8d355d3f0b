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
  the total noise sigma_bar(t), not t: `predict(x_t, t)` evaluates
  `model(x_t, time_fn(t))`, where `time_fn` is the process's schedule
  (`SEDDAbsorb.total_noise`), supplied by the caller.
* mdlm_dit -> masked. MDLM's backbone returns raw logits over V + 1 ids
  ([MASK] last). Its SUBS parameterisation (`dit_sedd.mdlm_subs_log_probs`)
  is: -inf on [MASK] before the softmax (zero masking), and unmasked
  tokens copied (carry-over). `MaskedProcess` expects logits over the V
  data tokens only and applies carry-over itself (it scores and updates
  masked positions only), so the adapter drops the [MASK] column: a
  softmax over the first V columns equals MDLM's (e^-1e6 is 0 in float32).
  The network reads sigma(t) = -log alpha(t); with `time_conditioning`
  false (the published mdlm-owt) it ignores it, as the process's
  `time_conditioning=False` assumes.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from diffusion_text.models import as_denoiser
from diffusion_text.models.denoiser import Transformer
from diffusion_text.models.dit_sedd import ScoreDiT
from diffusion_text.models.gpt2 import GPT2
from diffusion_text.processes import Denoiser, Process

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
  (SEDD: the total noise sigma_bar(t) of the process's schedule)."""
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


def masked_total_noise(process: Process) -> TimeFn:
  """sigma(t) = -log alpha(t) of a masked process, capped at MDLM's
  largest trained noise (alpha >= MDLM_MIN_ALPHA) so t = 1 stays finite."""
  return lambda t_B: -jnp.log(jnp.maximum(process.alpha(t_B), MDLM_MIN_ALPHA))


# ------------------------------------------------------------- registry
@dataclasses.dataclass(frozen=True)
class Backbone:
  """build(arch, process, rngs) -> module; bind(module, process) ->
  Denoiser; input_rows(arch) -> embedding rows, checked against the
  process's `model_spec.input_vocab`."""

  build: Callable[[Any, Process, nnx.Rngs], nnx.Module]
  bind: Callable[[nnx.Module, Process], Denoiser]
  input_rows: Callable[[Any], int]


BACKBONES: dict[str, Backbone] = {
    # The native DiT is sized from the process's ModelSpec itself.
    "dit": Backbone(
        build=lambda arch, process, rngs: Transformer(
            process.model_spec, arch, rngs=rngs),
        bind=lambda m, p: as_denoiser(m),
        input_rows=lambda arch: -1),
    # Our BOS (= V) is not a row of GPT-2's table; the adapter rewrites it.
    "gpt2": Backbone(
        build=lambda arch, process, rngs: GPT2(arch, rngs=rngs),
        bind=lambda m, p: gpt2_denoiser(m, bos_id=p.bos_id),
        input_rows=lambda arch: arch.vocab_size + 1),
    "sedd_dit": Backbone(
        build=lambda arch, process, rngs: ScoreDiT(arch, rngs=rngs),
        bind=lambda m, p: sedd_denoiser(m, p.total_noise),
        input_rows=lambda arch: arch.vocab_size),
    "mdlm_dit": Backbone(
        build=lambda arch, process, rngs: ScoreDiT(arch, rngs=rngs),
        bind=lambda m, p: mdlm_denoiser(m, masked_total_noise(p)),
        input_rows=lambda arch: arch.vocab_size),
}


def _backbone(name: str) -> Backbone:
  if name not in BACKBONES:
    raise ValueError(f"unknown model.backbone {name!r}; choose one of: "
                     f"{', '.join(BACKBONES)}")
  return BACKBONES[name]


def check_backbone(name: str, arch: Any, process: Process) -> None:
  """Raise if the backbone's vocabulary does not fit the process."""
  rows = _backbone(name).input_rows(arch)
  want = process.model_spec.input_vocab
  if rows >= 0 and rows != want:
    raise ValueError(
        f"backbone {name!r} has {rows} input ids (BOS/[MASK] included) but "
        f"process {type(process).__name__} with vocab_size="
        f"{process.vocab_size} needs {want}; set data vocabulary to match "
        "the checkpoint")


def build_backbone(name: str, arch: Any, process: Process,
                   seed: int = 0) -> nnx.Module:
  """A freshly initialised backbone `name` (arch: its config) for `process`."""
  check_backbone(name, arch, process)
  return _backbone(name).build(arch, process, nnx.Rngs(params=seed))


def bind_backbone(name: str, model: nnx.Module, process: Process) -> Denoiser:
  """The `Denoiser` through which `process` calls `model`."""
  return _backbone(name).bind(model, process)


__all__ = ["BACKBONES", "Backbone", "MDLM_MIN_ALPHA", "TimeFn",
           "bind_backbone", "build_backbone", "check_backbone",
           "gpt2_denoiser", "masked_total_noise", "mdlm_denoiser",
           "sedd_denoiser"]
