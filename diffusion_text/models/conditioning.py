"""Time conditioning: sinusoidal embedding of t, its MLP, and a learned gamma(t).

* `timestep_embedding` / `TimeEmbedding` follow DiT (Peebles & Xie 2023,
  sec. 3.2, "TimestepEmbedder"): sinusoids of t -> MLP -> cond vector that
  feeds every block's adaLN-zero modulation.
* `MonotoneGamma` is VDM's learned noise schedule (Kingma et al. 2021,
  sec. 5 and appendix, `NoiseSchedule_NNet`): a monotone MLP with
  positive weights, gamma(t) = -log SNR(t), rescaled so that its endpoints
  are exactly gamma(0) = gamma_min and gamma(1) = gamma_max.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

Array = jax.Array

# t in [0, 1] is stretched to [0, 1000] before the sinusoids so the usual
# max period of 10,000 spans the same frequency range as DiT's integer steps.
TIME_SCALE = 1000.0


def timestep_embedding(t_B: Array, dim: int,
                       max_period: float = 10_000.0) -> Array:
  """Sinusoidal features [B, dim] of t in [0, 1] (float32)."""
  half = dim // 2
  freqs_F = jnp.exp(-math.log(max_period)
                    * jnp.arange(half, dtype=jnp.float32) / half)
  angle_BxF = (TIME_SCALE * t_B.astype(jnp.float32))[:, None] * freqs_F
  emb_BxE = jnp.concatenate([jnp.cos(angle_BxF), jnp.sin(angle_BxF)], axis=-1)
  if dim % 2:
    emb_BxE = jnp.pad(emb_BxE, ((0, 0), (0, 1)))
  return emb_BxE


class TimeEmbedding(nnx.Module):
  """t [B] -> cond [B, cond_dim]: sinusoids, Linear, SiLU, Linear (fp32)."""

  def __init__(self, cond_dim: int, *, freq_dim: int = 256,
               rngs: nnx.Rngs):
    self.freq_dim = freq_dim
    init = nnx.initializers.normal(0.02)  # as DiT's TimestepEmbedder
    self.fc1 = nnx.Linear(freq_dim, cond_dim, kernel_init=init, rngs=rngs)
    self.fc2 = nnx.Linear(cond_dim, cond_dim, kernel_init=init, rngs=rngs)

  def __call__(self, t_B: Array) -> Array:
    h_BxC = self.fc1(timestep_embedding(t_B, self.freq_dim))
    return self.fc2(jax.nn.silu(h_BxC))


class MonotoneGamma(nnx.Module):
  """VDM's NoiseSchedule_NNet with fixed endpoints.

  g(t) = l1(t) + l3(phi(l2(2t - 1))) / n_features with |weights| (so g is
  increasing in t) and phi(h) = 2 * (sigmoid(h) - 1/2). Then
  gamma(t) = gamma_min + (gamma_max - gamma_min) (g(t) - g(0)) / (g(1) - g(0)).
  l1 starts as the line gamma_min + (gamma_max - gamma_min) t, so at
  initialisation gamma is (very nearly) linear between the endpoints.
  """

  def __init__(self, gamma_range: tuple[float, float], *,
               n_features: int = 1024, rngs: nnx.Rngs):
    gamma_min, gamma_max = (float(g) for g in gamma_range)
    if not gamma_max > gamma_min:
      raise ValueError(f"gamma_range must be increasing, got {gamma_range}")
    self.gamma_min, self.gamma_max = gamma_min, gamma_max
    self.n_features = n_features
    normal = nnx.initializers.normal(0.01)
    self.w1 = nnx.Param(jnp.full((1, 1), gamma_max - gamma_min, jnp.float32))
    self.b1 = nnx.Param(jnp.full((1,), gamma_min, jnp.float32))
    self.w2 = nnx.Param(normal(rngs.params(), (1, n_features), jnp.float32))
    self.b2 = nnx.Param(jnp.zeros((n_features,), jnp.float32))
    self.w3 = nnx.Param(normal(rngs.params(), (n_features, 1), jnp.float32))

  def _unnormalised(self, t_Nx1: Array) -> Array:
    h_Nx1 = t_Nx1 @ jnp.abs(self.w1[...]) + self.b1[...]
    u_NxF = (2.0 * (t_Nx1 - 0.5)) @ jnp.abs(self.w2[...]) + self.b2[...]
    u_NxF = 2.0 * (jax.nn.sigmoid(u_NxF) - 0.5)
    h_Nx1 = h_Nx1 + (u_NxF @ jnp.abs(self.w3[...])) / self.n_features
    return h_Nx1[:, 0]

  def __call__(self, t_B: Array) -> Array:
    t_B = jnp.asarray(t_B, jnp.float32).reshape(-1)
    ends_2 = jnp.array([0.0, 1.0], jnp.float32)
    g_N = self._unnormalised(jnp.concatenate([t_B, ends_2])[:, None])
    g_B, g0, g1 = g_N[:-2], g_N[-2], g_N[-1]
    frac_B = (g_B - g0) / (g1 - g0)
    return self.gamma_min + (self.gamma_max - self.gamma_min) * frac_B
