"""The denoiser backbone and its binding to the `Denoiser` bundle.

`build_model(spec, cfg, seed)` builds the one transformer for any process;
`as_denoiser(model)` hands it to a process as plain callables. Train and
sample steps split the model once (`graphdef, params = nnx.split(model)`)
and call `as_denoiser(nnx.merge(graphdef, params))` inside `jax.jit`.
"""

from __future__ import annotations

import jax
from flax import nnx

from diffusion_text.config import ModelConfig
from diffusion_text.models.denoiser import Transformer
from diffusion_text.contract import Denoiser, ModelSpec


def build_model(spec: ModelSpec, cfg: ModelConfig, seed: int) -> Transformer:
  """The backbone `spec` asks for, sized by `cfg`, initialised from `seed`."""
  return Transformer(spec, cfg, rngs=nnx.Rngs(params=seed))


def as_denoiser(model: Transformer, fused_loss: bool = True) -> Denoiser:
  """Bind the model's callables; extras it does not carry are None.

  With a logits head, `target_nll` is the model's fused head + cross-entropy
  at selected positions only; `fused_loss=False` leaves it out, so processes
  use the dense head everywhere (for comparisons); the same holds for
  `target_lse` (the same, with the logsumexp) and `map_logits`, the chunked
  head for vocabulary-sized losses, and `round_nll`, the fused rounding
  cross-entropy of a learned embedding table. A published backbone
  (`backbones.Adapted`) is bound through its registry adapter.
  """
  adapted = getattr(model, "adapted_denoiser", None)
  if adapted is not None:   # a published backbone (models.backbones.Adapted)
    return adapted()
  spec = model.spec
  return Denoiser(
      predict=model,
      target_nll=(model.target_nll
                  if fused_loss and spec.output == "logits" else None),
      target_lse=(model.target_lse
                  if fused_loss and spec.output == "logits" else None),
      map_logits=(model.map_logits
                  if fused_loss and spec.output == "logits" else None),
      embed=model.embed if spec.embed_vocab else None,
      round_logits=model.round_logits if spec.embed_vocab else None,
      round_nll=(model.round_nll
                 if fused_loss and spec.embed_vocab else None),
      gamma=model.gamma if spec.learned_schedule else None)


def count_params(model: nnx.Module) -> int:
  """Number of scalar parameters."""
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


__all__ = ["Transformer", "as_denoiser", "build_model", "count_params"]
