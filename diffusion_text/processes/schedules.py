"""Every noise schedule, as small objects with `alpha(t)` and its derivative,
behind one registry (`make_schedule`); each process names its schedule with
the option `schedule`.

`alpha(t)` is the signal level at time t in [0, 1]: the keep probability of a
categorical process (q(x_t = x_0) mass on the clean token, Austin et al. 2021;
Sahoo et al. 2024 eq. 2) or alpha-bar of a variance-preserving Gaussian
process (Ho et al. 2020, x_t = sqrt(alpha) x_0 + sqrt(1 - alpha) eps).
alpha(0) = 1, alpha decreases, alpha(1) ~ 0 (each class states its end).
Schedules are frozen dataclasses so processes holding them stay hashable.

Derived views every process may use: `one_minus_alpha` (overridden where it
cancels in float32), the total noise sigma_bar = -log alpha and its rate
sigma = -alpha'/alpha of a CTMC (SEDD), and gamma = -log SNR =
log((1 - alpha)/alpha) of a variance-preserving Gaussian (VDM).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp


def _f32(t):
  return jnp.asarray(t, jnp.float32)


@dataclasses.dataclass(frozen=True)
class Schedule:
  """Base class: subclasses define alpha and dalpha (d alpha / dt)."""

  def alpha(self, t):
    raise NotImplementedError

  def dalpha(self, t):
    raise NotImplementedError

  def log_alpha(self, t):
    return jnp.log(self.alpha(t))

  def one_minus_alpha(self, t):
    return 1.0 - self.alpha(t)

  def total(self, t):
    """sigma_bar(t) = -log alpha(t)."""
    return -self.log_alpha(t)

  def rate(self, t):
    """sigma(t) = d sigma_bar / dt = -alpha'(t) / alpha(t)."""
    return -self.dalpha(t) / self.alpha(t)

  def alpha_end(self) -> float:
    """alpha(1) as a Python float (decides static prior shapes)."""
    with jax.ensure_compile_time_eval():
      return float(self.alpha(jnp.ones((), jnp.float32)))


@dataclasses.dataclass(frozen=True)
class Linear(Schedule):
  """alpha(t) = 1 - t (MDLM/MD4 linear; D3PM absorbing's 1/(T - i + 1))."""

  def alpha(self, t):
    return 1.0 - t

  def dalpha(self, t):
    return -jnp.ones_like(t)

  def one_minus_alpha(self, t):
    return t


@dataclasses.dataclass(frozen=True)
class CosineAlpha(Schedule):
  """alpha(t) = cos(pi/2 t); alpha(1) = 0 up to rounding. Not MD4's cosine
  (that is `MD4Cosine`); registered as 'cosine_alpha'."""

  def alpha(self, t):
    return jnp.cos(0.5 * math.pi * t)

  def dalpha(self, t):
    return -0.5 * math.pi * jnp.sin(0.5 * math.pi * t)

  def one_minus_alpha(self, t):
    # 1 - cos(x) = 2 sin(x/2)^2: no cancellation at small t, where float32
    # cos(pi/2 t) == 1 for t < ~3e-4.
    return 2.0 * jnp.sin(0.25 * math.pi * t) ** 2


@dataclasses.dataclass(frozen=True)
class MD4Cosine(Schedule):
  """MD4's cosine (Shi et al. 2024, table 1 and its code):
  alpha(t) = eps + (1 - 2 eps) (1 - cos(pi/2 (1 - t))), which is
  1 - sin(pi/2 t) squeezed into [eps, 1 - eps]. alpha(0) = 1 - eps (the
  masked process's reconstruction term covers it), alpha(1) = eps."""

  eps: float = 1e-4

  def alpha(self, t):
    return self.eps + (1.0 - 2.0 * self.eps) * (
        1.0 - jnp.cos(0.5 * math.pi * (1.0 - _f32(t))))

  def dalpha(self, t):
    return -(1.0 - 2.0 * self.eps) * 0.5 * math.pi * jnp.sin(
        0.5 * math.pi * (1.0 - _f32(t)))

  def one_minus_alpha(self, t):
    # 1 - alpha = eps + (1 - 2 eps) sin(pi/2 t): no cancellation near t = 0.
    return self.eps + (1.0 - 2.0 * self.eps) * jnp.sin(0.5 * math.pi * _f32(t))

  def alpha_end(self) -> float:
    return self.eps


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


@dataclasses.dataclass(frozen=True)
class LogLinear(Schedule):
  """sigma_bar(t) = -log(1 - (1 - eps) t), alpha = 1 - (1 - eps) t (SEDD
  noise_lib.LogLinearNoise; the MDLM linear schedule when eps = 0).
  alpha(1) = eps."""

  eps: float = 1e-3

  def total(self, t):
    return -jnp.log1p(-(1.0 - self.eps) * _f32(t))

  def rate(self, t):
    return (1.0 - self.eps) / self.alpha(t)

  def alpha(self, t):
    return 1.0 - (1.0 - self.eps) * _f32(t)

  def one_minus_alpha(self, t):
    return (1.0 - self.eps) * _f32(t)

  def dalpha(self, t):
    return -(1.0 - self.eps) * jnp.ones_like(_f32(t))

  def alpha_end(self) -> float:
    return self.eps


@dataclasses.dataclass(frozen=True)
class Geometric(Schedule):
  """sigma_bar(t) = sigma_min^(1-t) sigma_max^t (SEDD noise_lib.GeometricNoise).
  alpha(0) = exp(-sigma_min) < 1 (a reconstruction term covers it);
  alpha(1) = exp(-sigma_max)."""

  sigma_min: float = 1e-4
  sigma_max: float = 20.0

  def total(self, t):
    t = _f32(t)
    return self.sigma_min ** (1.0 - t) * self.sigma_max ** t

  def rate(self, t):
    return self.total(t) * math.log(self.sigma_max / self.sigma_min)

  def alpha(self, t):
    return jnp.exp(-self.total(t))

  def one_minus_alpha(self, t):
    return -jnp.expm1(-self.total(t))

  def dalpha(self, t):
    return -self.rate(t) * self.alpha(t)

  def alpha_end(self) -> float:
    return math.exp(-self.sigma_max)


@dataclasses.dataclass(frozen=True)
class LinearGamma(Schedule):
  """VDM's fixed schedule: gamma(t) = -log SNR(t) on the line from gamma_min
  (t = 0) to gamma_max (t = 1) (Kingma et al. 2021 sec. 5), so alpha-bar =
  sigmoid(-gamma): alpha(0) = sigmoid(-gamma_min) ~ 1, alpha(1) =
  sigmoid(-gamma_max) (~0.0067 with the default 5.0)."""

  gamma_min: float = -13.3
  gamma_max: float = 5.0

  def gamma(self, t):
    return self.gamma_min + (self.gamma_max - self.gamma_min) * _f32(t)

  def alpha(self, t):
    return jax.nn.sigmoid(-self.gamma(t))

  def one_minus_alpha(self, t):
    return jax.nn.sigmoid(self.gamma(t))

  def dalpha(self, t):
    g = self.gamma(t)
    return -(self.gamma_max - self.gamma_min) * (
        jax.nn.sigmoid(-g) * jax.nn.sigmoid(g))


# name -> schedule class. Every schedule of every process is here.
_SCHEDULES: dict[str, type[Schedule]] = {
    "linear": Linear,
    "cosine_alpha": CosineAlpha,
    "md4_cosine": MD4Cosine,
    "cosine_vp": CosineVP,
    "linear_beta": LinearBetaVP,
    "loglinear": LogLinear,
    "geometric": Geometric,
    "linear_gamma": LinearGamma,
}


# Old names that now fail with a pointer to the new ones.
_RENAMED = {"cosine": "use 'cosine_alpha' (alpha = cos(pi t / 2), what "
                      "'cosine' computed) or 'md4_cosine' (MD4's schedule)"}


def names() -> list[str]:
  return list(_SCHEDULES)


def check_schedule(name: str, allowed=None, process: str = "") -> None:
  """Raise a clear error unless `name` is registered (and in `allowed`)."""
  valid = list(_SCHEDULES) if allowed is None else list(allowed)
  if name not in _SCHEDULES or name not in valid:
    where = f" for process {process!r}" if process else ""
    if name in _RENAMED:
      raise ValueError(f"schedule {name!r}{where} was renamed: "
                       f"{_RENAMED[name]}")
    raise ValueError(f"unknown schedule {name!r}{where}; choose one of: "
                     f"{', '.join(valid)}")


def make_schedule(name: str, **params) -> Schedule:
  """The schedule `name`, given whichever of `params` it declares (a process
  passes all its range options; each schedule takes its own)."""
  check_schedule(name)
  cls = _SCHEDULES[name]
  fields = {f.name for f in dataclasses.fields(cls)}
  return cls(**{k: v for k, v in params.items() if k in fields})


def register_schedule(name: str, cls: type) -> None:
  """A new schedule family is one class and one call here."""
  _SCHEDULES[name] = cls
