"""Noise schedules as small objects with `alpha(t)` and its derivative.

`alpha(t)` is the signal level at time t in [0, 1]: the keep probability of a
categorical process (q(x_t = x_0) mass on the clean token, Austin et al. 2021;
Sahoo et al. 2024 eq. 2) or alpha-bar of a variance-preserving Gaussian
process (Ho et al. 2020, x_t = sqrt(alpha) x_0 + sqrt(1 - alpha) eps).
alpha(0) = 1, alpha decreases, alpha(1) ~ 0. Schedules are frozen dataclasses
so processes holding them stay hashable.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Schedule:
  """Base class: subclasses define alpha and dalpha (d alpha / dt)."""

  def alpha(self, t):
    raise NotImplementedError

  def dalpha(self, t):
    raise NotImplementedError

  def log_alpha(self, t):
    return jnp.log(self.alpha(t))


@dataclasses.dataclass(frozen=True)
class Linear(Schedule):
  """alpha(t) = 1 - t (MDLM/MD4 linear; D3PM absorbing's 1/(T - i + 1))."""

  def alpha(self, t):
    return 1.0 - t

  def dalpha(self, t):
    return -jnp.ones_like(t)


@dataclasses.dataclass(frozen=True)
class Cosine(Schedule):
  """alpha(t) = cos(pi/2 t) (MD4 'cosine'); alpha(1) = 0 up to rounding."""

  def alpha(self, t):
    return jnp.cos(0.5 * math.pi * t)

  def dalpha(self, t):
    return -0.5 * math.pi * jnp.sin(0.5 * math.pi * t)


@dataclasses.dataclass(frozen=True)
class CosineVP(Schedule):
  """Nichol & Dhariwal 2021 eq. 17: alpha-bar = f(t)/f(0),
  f(t) = cos((t + s)/(1 + s) * pi/2)^2, clipped so alpha(1) > 0."""

  s: float = 0.008
  min_alpha: float = 1e-5

  def _f(self, t):
    return jnp.cos((t + self.s) / (1.0 + self.s) * 0.5 * math.pi) ** 2

  def alpha(self, t):
    return jnp.clip(self._f(t) / self._f(0.0), self.min_alpha, 1.0)

  def dalpha(self, t):
    u = (t + self.s) / (1.0 + self.s) * 0.5 * math.pi
    df = -2.0 * jnp.cos(u) * jnp.sin(u) * 0.5 * math.pi / (1.0 + self.s)
    return df / self._f(0.0)


@dataclasses.dataclass(frozen=True)
class LinearBetaVP(Schedule):
  """Continuous-time DDPM linear-beta schedule (Ho et al. 2020; Song et al.
  2021 VP-SDE): beta(t) = T*(b0 + (b1 - b0) t) so a T-step chain with
  beta_i = linspace(b0, b1, T) has alpha-bar(i/T) ~ prod(1 - beta_i)."""

  beta_min: float = 1e-4
  beta_max: float = 0.02
  num_steps: int = 1000

  def _integral(self, t):
    b0 = self.beta_min * self.num_steps
    b1 = self.beta_max * self.num_steps
    return b0 * t + 0.5 * (b1 - b0) * t ** 2

  def alpha(self, t):
    return jnp.exp(-self._integral(t))

  def dalpha(self, t):
    b0 = self.beta_min * self.num_steps
    b1 = self.beta_max * self.num_steps
    return -(b0 + (b1 - b0) * t) * self.alpha(t)


_SCHEDULES = {
    "linear": Linear,
    "cosine": Cosine,
    "cosine_vp": CosineVP,
    "linear_beta": LinearBetaVP,
}


def make_schedule(name: str, **kwargs) -> Schedule:
  if name not in _SCHEDULES:
    raise ValueError(
        f"unknown schedule {name!r}; choose one of: {', '.join(_SCHEDULES)}")
  return _SCHEDULES[name](**kwargs)


def register_schedule(name: str, cls: type) -> None:
  """Processes with their own schedule families add them here by name."""
  _SCHEDULES[name] = cls
