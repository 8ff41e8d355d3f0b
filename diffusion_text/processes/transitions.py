"""Closed-form D3PM transition families (Austin et al. 2021, sec. 3 and
appendix A.2), used by `categorical.py`, `masked.py` and `sedd.py`.

Both families have the form

    Q(r) = r I + (1 - r) 1 pi^T,      Q[j, k] = q(x_t = k | x_s = j),

with a keep probability r and a limit distribution pi over K states:

  * Uniform:   K = V,     pi = 1/V   (Q_t = (1 - b) I + b/V 11^T, r = 1 - b);
  * Absorbing: K = V + 1, pi = e_m   (Q_t = (1 - b) I + b 1 e_m^T), where the
    [MASK] id is m = V.

Products stay in the family, Q(r1) Q(r2) = Q(r1 r2), so the marginal
Q-bar_t = Q(alpha_t) and the s -> t transition is Q(alpha_t / alpha_s). Every
operation below is O(K) per position from these closed forms; a dense K x K
matrix is built only by `dense_matrix`, for tests.

Shapes: `r` broadcasts against the id array it is used with (e.g. [B, 1]
against [B, L]); distributions carry a trailing state axis [..., K].
"""

from __future__ import annotations

import abc
import dataclasses
import math

import jax
import jax.numpy as jnp

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Transition(abc.ABC):
  """Q(r) = r I + (1 - r) 1 pi^T over `num_states` states."""

  vocab_size: int  # V data tokens

  @property
  @abc.abstractmethod
  def num_states(self) -> int:
    """K: V, or V + 1 with the absorbing [MASK]."""

  @abc.abstractmethod
  def limit(self) -> Array:
    """pi [K]: the distribution Q(0) sends every state to."""

  @abc.abstractmethod
  def limit_prob(self, k: Array) -> Array:
    """pi_k for ids k [...] -> [...] (without building pi per position)."""

  @abc.abstractmethod
  def sample(self, key: Array, x: Array, r: Array) -> Array:
    """Draw y ~ Q(r)[x, :] for ids x [...] -> ids [...]."""

  def marginal(self, x: Array, r: Array) -> Array:
    """Row Q(r)[x, :] -> [..., K]: q(x_t | x_s = x) with keep prob r."""
    r = jnp.asarray(r, jnp.float32)[..., None]
    onehot = jax.nn.one_hot(x, self.num_states, dtype=jnp.float32)
    return r * onehot + (1.0 - r) * self.limit()

  def mix(self, p: Array, r: Array) -> Array:
    """p Q(r) -> [..., K] for a distribution p [..., V] over data tokens
    (zero-padded to K states), i.e. sum_x0 p(x0) q(x_t | x0)."""
    r = jnp.asarray(r, jnp.float32)[..., None]
    pad = self.num_states - p.shape[-1]
    p = jnp.pad(p, [(0, 0)] * (p.ndim - 1) + [(0, pad)])
    return r * p + (1.0 - r) * self.limit()

  def column(self, k: Array, r: Array) -> Array:
    """Column Q(r)[:, k] -> [..., K]: q(x_t = k | x_s = j) over j."""
    r = jnp.asarray(r, jnp.float32)
    onehot = jax.nn.one_hot(k, self.num_states, dtype=jnp.float32)
    return (r[..., None] * onehot
            + ((1.0 - r) * self.limit_prob(k))[..., None])

  @classmethod
  def dense_matrix(cls, beta: Array, vocab_size: int) -> Array:
    """One-step Q = (1 - beta) I + beta 1 pi^T as a dense [K, K] (tests)."""
    family = cls(vocab_size)
    eye = jnp.eye(family.num_states, dtype=jnp.float32)
    return (1.0 - beta) * eye + beta * family.limit()[None, :]


@dataclasses.dataclass(frozen=True)
class Uniform(Transition):
  """Uniform replacement: pi = 1/V (Austin et al. 2021, appendix A.2.1)."""

  @property
  def num_states(self) -> int:
    return self.vocab_size

  def limit(self) -> Array:
    return jnp.full((self.vocab_size,), 1.0 / self.vocab_size, jnp.float32)

  def limit_prob(self, k: Array) -> Array:
    return jnp.full(jnp.shape(k), 1.0 / self.vocab_size, jnp.float32)

  def sample(self, key: Array, x: Array, r: Array) -> Array:
    # One uniform decides keep/replace, one randint is the replacement.
    keep_key, noise_key = jax.random.split(key)
    keep = jax.random.uniform(keep_key, x.shape) < r
    noise = jax.random.randint(noise_key, x.shape, 0, self.vocab_size,
                               dtype=x.dtype)
    return jnp.where(keep, x, noise)


@dataclasses.dataclass(frozen=True)
class Absorbing(Transition):
  """Absorbing [MASK] state m = V: pi = e_m (Austin et al. 2021, A.2.3)."""

  @property
  def mask_id(self) -> int:
    return self.vocab_size

  @property
  def num_states(self) -> int:
    return self.vocab_size + 1

  def limit(self) -> Array:
    return jax.nn.one_hot(self.mask_id, self.num_states, dtype=jnp.float32)

  def limit_prob(self, k: Array) -> Array:
    return (k == self.mask_id).astype(jnp.float32)

  def sample(self, key: Array, x: Array, r: Array) -> Array:
    keep = jax.random.uniform(key, x.shape) < r
    return jnp.where(keep, x, jnp.asarray(self.mask_id, x.dtype))

  def base_prior(self, key: Array, shape: tuple[int, ...],
                 alpha_1: float) -> Array:
    """Draw from p_base = alpha_1 Uniform(V) + (1 - alpha_1) delta_[MASK],
    the prior matching q(x_1 | x_0) of a schedule ending at alpha(1) =
    alpha_1 up to alpha_1 log V nats per token (`base_prior_kl`); all
    [MASK] without random numbers when alpha_1 = 0 (MDLM, SEDD)."""
    all_mask = jnp.full(shape, self.mask_id, jnp.int32)
    if alpha_1 == 0.0:
      return all_mask
    keep_key, token_key = jax.random.split(key)
    keep = jax.random.uniform(keep_key, shape) < alpha_1
    tokens = jax.random.randint(token_key, shape, 0, self.vocab_size)
    return jnp.where(keep, tokens, all_mask)

  def base_prior_kl(self, alpha_1):
    """KL(alpha_1 delta_x0 + (1 - alpha_1) delta_M || p_base) per token:
    alpha_1 log V."""
    return alpha_1 * math.log(self.vocab_size)


class AbsorbingStates:
  """Mixin for processes over V tokens plus [MASK] (masked, SEDD-absorb):
  their `transition` and `mask_id`, defined once."""

  @property
  def transition(self) -> Absorbing:
    return Absorbing(self.vocab_size)

  @property
  def mask_id(self) -> int:
    return self.transition.mask_id
