"""Chunked row maps whose gradient is formed in the forward pass.

`contract.map_rows` keeps a chunked head's memory at one chunk by
recomputing each chunk in the backward pass: per chunk the head's logits
matmul and the row function run twice. A loss is usually a fixed linear
combination of the per-row values, sum_n w_n . out_n, with weights w known
before the head runs (the process's per-position loss weights). Then the
gradient of every chunk can be formed right after its values, from the same
logits, and the backward pass only scales it by the cotangent's factor:

  forward:  out_C, vjp_C = vjp(fn, shared, rows_C);  grads += vjp_C(w_C)
  backward: cotangent g = c w  ->  c * grads

`map_rows_folded` checks that assumption in the backward pass (g equals the
weights times one factor, to WEIGHTS_RTOL of the largest cotangent); where it
fails it recomputes the exact gradient as `map_rows` would, so a wrong
weighting costs time, never accuracy. Whether that happens is a runtime
fact, told by a host callback only when `warn_enabled()` (environment
variable DIFFUSION_TEXT_WARN_RECOMPUTE=1, read when a loss is traced):
a computation with a host callback is never written to JAX's persistent
compilation cache (JAX_COMPILATION_CACHE_DIR), so by default the train step
has none. The tests of the processes' weights turn it on.
"""

from __future__ import annotations

import functools
import os
import warnings
from typing import Callable

import jax
import jax.numpy as jnp

from diffusion_text import contract
from diffusion_text.contract import join_rows, map_rows, split_rows

Array = jax.Array

# The cotangents must equal the weights times one factor to this relative
# tolerance of the largest cotangent (float32 rounding of the same product
# is ~1e-7).
WEIGHTS_RTOL = 1e-5


def weights_factor(cotangents, weights) -> tuple[Array, Array]:
  """(c, ok): the least-squares c with cotangents ~ c * weights over all
  leaves, and whether every entry fits to WEIGHTS_RTOL of the largest.
  Non-finite cotangents (a diverged loss) count as fitting: c is then
  non-finite and so is the gradient, as it would be recomputed."""
  gs = [jnp.asarray(g, jnp.float32) for g in jax.tree.leaves(cotangents)]
  ws = [jnp.asarray(w, jnp.float32) for w in jax.tree.leaves(weights)]
  norm = sum(jnp.sum(w * w) for w in ws)
  c = sum(jnp.sum(g * w) for g, w in zip(gs, ws)) / jnp.where(
      norm > 0, norm, 1.0)
  err = functools.reduce(jnp.maximum, [jnp.max(jnp.abs(g - c * w))
                                       for g, w in zip(gs, ws)])
  scale = functools.reduce(jnp.maximum, [jnp.max(jnp.abs(g)) for g in gs])
  return c, (err <= WEIGHTS_RTOL * scale) | ~jnp.isfinite(scale)


WARN_ENV = "DIFFUSION_TEXT_WARN_RECOMPUTE"


def warn_enabled() -> bool:
  """Whether a recomputing backward pass warns (see the module docstring)."""
  return os.environ.get(WARN_ENV, "0") not in ("", "0")


def maybe_warn_recomputed(what: str = "map_rows_folded") -> None:
  """Inside a traced backward branch: a host callback that warns when the
  branch runs, if `warn_enabled()`; nothing otherwise."""
  if warn_enabled():
    jax.debug.callback(lambda: warn_recomputed(what))  # looked up when run


def warn_recomputed(what: str = "map_rows_folded"):
  warnings.warn(f"{what}: the cotangents did not match the given loss "
                "`weights` (up to one factor), so the gradient was "
                "recomputed in the backward pass (exact, but slower); pass "
                "the weights the objective really applies, or none.",
                stacklevel=2)


def _is_float(a) -> bool:
  return jnp.issubdtype(jnp.result_type(a), jnp.inexact)


def map_rows_folded(fn: Callable, shared, rows, weights,
                    chunk: int | None = None):
  """fn(shared, rows of C) over chunks of the leading axis of `rows`.

  Values equal `contract.map_rows(lambda r: fn(shared, r), rows)`;
  differentiable in `shared`, in the float leaves of `rows` and in arrays
  `fn` closes over. `weights`: a pytree like fn's output, [N, ...] leaves
  (the weight of each output in the caller's loss, up to one factor; see the
  module docstring). Memory: one chunk's temporaries plus one gradient of
  `shared` and of the float rows.
  """
  n = jax.tree.leaves(rows)[0].shape[0]
  chunk = min(chunk or contract.ROW_CHUNK, n)  # looked up at call time
  row_leaves, row_tree = jax.tree.flatten(rows)
  is_float = [_is_float(a) for a in row_leaves]
  float_rows = tuple(a for a, f in zip(row_leaves, is_float) if f)
  other_rows = tuple(a for a, f in zip(row_leaves, is_float) if not f)

  def merge(float_rows, other_rows):
    fl, ot = iter(float_rows), iter(other_rows)
    return jax.tree.unflatten(row_tree,
                              [next(fl) if f else next(ot) for f in is_float])

  def chunk_fn(shared, float_rows, other_rows):
    return fn(shared, merge(float_rows, other_rows))

  # Arrays fn closes over become explicit, differentiable inputs.
  first = lambda a: a[:chunk]
  conv_fn, consts = jax.closure_convert(
      chunk_fn, shared, tuple(map(first, float_rows)),
      tuple(map(first, other_rows)))
  fwd = lambda sh, fr, ot: conv_fn(sh[0], fr, ot, *sh[1])
  return _folded(fwd, chunk, (shared, tuple(consts)), float_rows, other_rows,
                 weights)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _folded(fn, chunk, shared, float_rows, other_rows, weights):
  del weights
  return _plain(fn, chunk, shared, float_rows, other_rows)


def _plain(fn, chunk, shared, float_rows, other_rows):
  return map_rows(lambda r: fn(shared, *r), (float_rows, other_rows), chunk)


def _folded_fwd(fn, chunk, shared, float_rows, other_rows, weights):
  n = jax.tree.leaves((float_rows, other_rows))[0].shape[0]
  split = lambda a: split_rows(a, chunk)
  # Padded rows (copies of the last) must not reach the gradient.
  pad = lambda w: jnp.pad(jnp.asarray(w, jnp.float32),
                          [(0, -n % chunk)] + [(0, 0)] * (jnp.ndim(w) - 1)
                          ).reshape(-1, chunk, *jnp.shape(w)[1:])

  def body(d_shared, xs):
    fr_C, ot_C, w_C = xs
    out_C, vjp = jax.vjp(lambda sh, fr: fn(sh, fr, ot_C), shared, fr_C)
    w_C = jax.tree.map(lambda w, o: w.astype(o.dtype), w_C, out_C)
    ds, dfr_C = vjp(w_C)
    return jax.tree.map(jnp.add, d_shared, ds), (out_C, dfr_C)

  zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, jnp.float32), shared)
  d_shared, (out, d_rows) = jax.lax.scan(
      body, zeros, (jax.tree.map(split, float_rows),
                    jax.tree.map(split, other_rows),
                    jax.tree.map(pad, weights)))
  out = jax.tree.map(lambda a: join_rows(a, n), out)
  d_rows = jax.tree.map(lambda a: join_rows(a, n), d_rows)
  return out, (shared, float_rows, other_rows, weights, d_shared, d_rows)


def _folded_bwd(fn, chunk, res, g):
  shared, float_rows, other_rows, weights, d_shared, d_rows = res
  c, ok = weights_factor(g, weights)

  def fast(g):
    del g
    cast = lambda d, p: (c * d).astype(p.dtype)
    return (jax.tree.map(cast, d_shared, shared),
            jax.tree.map(cast, d_rows, float_rows))

  def slow(g):
    maybe_warn_recomputed()
    _, vjp = jax.vjp(lambda sh, fr: _plain(fn, chunk, sh, fr, other_rows),
                     shared, float_rows)
    return vjp(g)

  d_sh, d_fr = jax.lax.cond(ok, fast, slow, g)
  return d_sh, d_fr, None, jax.tree.map(jnp.zeros_like, weights)


_folded.defvjp(_folded_fwd, _folded_bwd)
