"""Shared test fixtures for processes and the sampling loop."""

import json

import jax.numpy as jnp

from diffusion_text.contract import Denoiser


def constant_logits(logits, embed=None) -> Denoiser:
  """A denoiser predicting the same logits ([V], or [L, V] per position) at
  every position, whatever x_t (ids [B, L] or latents [B, L, D]), t and
  self-conditioning; `embed` is passed through for Gaussian processes."""
  logits = jnp.asarray(logits, jnp.float32)

  def predict(x, t, self_cond=None):
    del t, self_cond
    return jnp.broadcast_to(logits, x.shape[:2] + logits.shape[-1:])

  return Denoiser(predict=predict, embed=embed)


def strict_json(text: str):
  """json.loads that fails on NaN / Infinity: results files are strict JSON
  (a missing standard error is null)."""
  def reject(token):
    raise AssertionError(f"{token} in a results file: strict JSON writes null")
  return json.loads(text, parse_constant=reject)


def count_recomputes(monkeypatch) -> list:
  """The chunked heads' fallback recomputations (`models.folded`), one list
  entry each: turns their warning on and records it instead."""
  from diffusion_text.models import folded
  calls = []
  monkeypatch.setenv(folded.WARN_ENV, "1")
  monkeypatch.setattr(folded, "warn_recomputed",
                      lambda *args: calls.append(args))
  return calls
