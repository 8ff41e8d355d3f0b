"""Tests for the denoiser backbone (diffusion_text/models)."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from diffusion_text.config import ModelConfig
from diffusion_text.models import as_denoiser, build_model, count_params
from diffusion_text.models.cross_entropy import (chunk_logits,
                                                 selected_cross_entropy)
from diffusion_text.processes.base import ModelSpec
from tests.helpers import count_recomputes

B, L, V, D = 2, 8, 11, 8
CFG = ModelConfig(num_layers=2, d_model=32, num_heads=2, mlp_ratio=2,
                  cond_dim=16)


def perturb(model, seed=1, scale=0.2):
  """Add noise to every parameter so zero-initialised gates and heads act."""
  graphdef, params = nnx.split(model)
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  leaves = [x + scale * jax.random.normal(k, x.shape, x.dtype)
            for k, x in zip(keys, leaves)]
  return nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))


def inputs(spec, seed=0):
  key = jax.random.key(seed)
  if spec.input == "tokens":
    return jax.random.randint(key, (B, L), 0, spec.input_vocab)
  return jax.random.normal(key, (B, L, D))


def spec_for(stem, head, **kw):
  return ModelSpec(input=stem, output=head,
                   output_dim=V if head == "logits" else D,
                   input_vocab=V + 1 if stem == "tokens" else None,
                   latent_dim=D if stem == "latents" else None, **kw)


@pytest.mark.parametrize("stem,head,extra", [
    ("tokens", "logits", {}),
    ("tokens", "vector", {"causal": True}),
    ("latents", "logits", {}),
    ("latents", "vector", {"self_conditioning": True, "embed_vocab": V,
                           "learned_schedule": True}),
])
def test_shapes_and_params_only(stem, head, extra):
  spec = spec_for(stem, head, **extra)
  model = build_model(spec, CFG, seed=0)
  graphdef, params = nnx.split(model)
  variables = jax.tree.leaves(nnx.state(model),
                              is_leaf=lambda v: isinstance(v, nnx.Variable))
  assert variables and all(type(v) is nnx.Param for v in variables)
  assert count_params(model) == sum(x.size for x in jax.tree.leaves(params))

  @jax.jit
  def apply(params, x, t, self_cond=None):
    return nnx.merge(graphdef, params)(x, t, self_cond)

  x, t_B = inputs(spec), jnp.full((B,), 0.5)
  out = apply(params, x, t_B)
  assert out.shape == (B, L, spec.output_dim) and out.dtype == jnp.float32
  # adaLN-zero: the head starts at zero, so the initial output is zero.
  np.testing.assert_array_equal(out, 0.0)
  noisy = nnx.split(perturb(model))[1]
  out = apply(noisy, x, t_B)
  assert np.all(np.isfinite(out)) and np.abs(out).max() > 0

  denoiser = as_denoiser(model)
  assert (denoiser.embed is None) == (not spec.embed_vocab)
  assert (denoiser.gamma is None) == (not spec.learned_schedule)
  if spec.self_conditioning:
    sc = jax.random.normal(jax.random.key(3), x.shape)
    assert not np.allclose(apply(noisy, x, t_B, sc), out)
    np.testing.assert_allclose(apply(noisy, x, t_B, jnp.zeros_like(x)), out,
                               rtol=1e-6, atol=1e-6)


def _influence_LxL(model):
  """|d out_i / d x_j| summed over features, for one latent sequence."""
  x = inputs(spec_for("latents", "vector"))[:1]
  t_B = jnp.full((1,), 0.3)
  graphdef, params = nnx.split(model)
  jac = jax.jit(jax.jacrev(lambda x: nnx.merge(graphdef, params)(x, t_B)))(x)
  # jac: [1, L, D, 1, L, D]
  return np.abs(np.asarray(jac)).sum(axis=(0, 2, 3, 5))


def test_causal_attention_by_gradient():
  causal = perturb(build_model(spec_for("latents", "vector", causal=True),
                               CFG, seed=0))
  infl = _influence_LxL(causal)
  np.testing.assert_array_equal(np.triu(infl, k=1), 0.0)
  assert np.all(infl[np.tril_indices(L)] > 0)
  bidir = perturb(build_model(spec_for("latents", "vector"), CFG, seed=0))
  assert np.all(_influence_LxL(bidir) > 0)


def _softmax_attention_64(q, k, v, causal):
  """float64 numpy softmax(q k^T / sqrt(H)) v, q, k, v [B, heads, L, H]."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  s = np.einsum("bnlh,bnmh->bnlm", q, k) / np.sqrt(q.shape[-1])
  if causal:
    s = np.where(np.tril(np.ones(s.shape[-2:], bool)), s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  return np.einsum("bnlm,bnmh->bnlh", p / p.sum(-1, keepdims=True), v)


@pytest.mark.parametrize("causal", [False, True])
def test_attention_core_is_softmax_attention_in_value_and_grad(causal):
  """`models.attention`: the value is softmax(q k^T / sqrt(H)) v (float64
  reference) and its hand-written VJP is the gradient (float64 central
  differences of that reference, on random directions)."""
  from diffusion_text.models.attention import attention
  b, n, length, h = 2, 3, 7, 8
  keys = jax.random.split(jax.random.key(0), 4)
  q, k, v, g = (jax.random.normal(kk, (b, n, length, h)) for kk in keys)
  scale = h ** -0.5
  out = attention(q * scale, k, v, causal=causal)
  np.testing.assert_allclose(out, _softmax_attention_64(q, k, v, causal),
                             rtol=1e-5, atol=1e-5)

  loss = lambda q, k, v: jnp.sum(attention(q * scale, k, v, causal=causal)
                                 * g)
  grads = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
  ref = lambda q, k, v: np.sum(_softmax_attention_64(q, k, v, causal)
                               * np.asarray(g, np.float64))
  rng, eps = np.random.default_rng(0), 1e-4
  args = [np.asarray(a, np.float64) for a in (q, k, v)]
  for i, grad in enumerate(grads):
    for _ in range(3):
      d = rng.standard_normal(args[i].shape)
      plus, minus = list(args), list(args)
      plus[i], minus[i] = args[i] + eps * d, args[i] - eps * d
      numeric = (ref(*plus) - ref(*minus)) / (2 * eps)
      np.testing.assert_allclose(np.sum(np.asarray(grad, np.float64) * d),
                                 numeric, rtol=1e-4, atol=1e-4)
  if causal:  # the first query's output does not depend on later keys
    gq = jax.grad(lambda k: jnp.sum(attention(q, k, v, causal=True)[:, :, 0]))
    np.testing.assert_array_equal(gq(k)[:, :, 1:], 0.0)


def test_attention_layer_matches_jax_dot_product_attention():
  """`layers.Attention` gives the numbers of the same weights run through
  `jax.nn.dot_product_attention` ([B, L, heads, H], scale on the scores),
  in value and in every parameter's gradient; bf16 runs in bf16."""
  from diffusion_text.models.layers import Attention, apply_flat, rotary
  d, heads = 32, 4
  x = jax.random.normal(jax.random.key(1), (2, 9, d))
  for causal in (False, True):
    layer = perturb(Attention(d, heads, causal=causal, dtype=jnp.float32,
                              rngs=nnx.Rngs(0)))
    graphdef, params = nnx.split(layer)

    def ours(params):
      return jnp.sum(jnp.sin(nnx.merge(graphdef, params)(x)))

    def reference(params):
      m = nnx.merge(graphdef, params)
      qkv = apply_flat(m.qkv, x).reshape(2, 9, 3, heads, d // heads)
      out = jax.nn.dot_product_attention(
          rotary(qkv[:, :, 0]), rotary(qkv[:, :, 1]), qkv[:, :, 2],
          is_causal=causal)
      return jnp.sum(jnp.sin(apply_flat(m.out, out.reshape(2, 9, d))))

    (got, got_g), (want, want_g) = (jax.value_and_grad(f)(params)
                                    for f in (ours, reference))
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for a, w in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g)):
      np.testing.assert_allclose(a, w, rtol=1e-4, atol=1e-5)
  bf16 = Attention(d, heads, causal=True, dtype=jnp.bfloat16,
                   rngs=nnx.Rngs(0))
  assert bf16(x.astype(jnp.bfloat16)).dtype == jnp.bfloat16


def test_ported_packed_attention_matches_jax_dot_product_attention():
  """The imported backbones' `ported.packed_attention` (the same core on
  packed q|k|v projections) gives `jax.nn.dot_product_attention`'s value
  and input gradient, with and without rotary positions, causal or not."""
  from diffusion_text.models.layers import rotary
  from diffusion_text.models.ported import packed_attention
  b, length, heads, hd = 2, 9, 3, 8
  qkv = jax.random.normal(jax.random.key(3), (b, length, 3 * heads * hd))
  weight = jax.random.normal(jax.random.key(4), (b, length, heads * hd))
  for causal, rope in ((False, True), (True, False)):
    def reference(qkv):
      q, k, v = (qkv.reshape(b, length, 3, heads, hd)[:, :, i]
                 for i in range(3))
      if rope:
        q, k = rotary(q), rotary(k)
      out = jax.nn.dot_product_attention(q, k, v, is_causal=causal)
      return jnp.sum(weight * out.reshape(b, length, -1))

    def ours(qkv):
      return jnp.sum(weight * packed_attention(qkv, heads, causal=causal,
                                               rope=rope))

    (got, got_g), (want, want_g) = (jax.value_and_grad(f)(qkv)
                                    for f in (ours, reference))
    np.testing.assert_allclose(got, want, rtol=1e-5)
    np.testing.assert_allclose(got_g, want_g, rtol=1e-4, atol=1e-5)


def test_rotary_is_roformer_in_the_half_layout():
  """`layers.rotary` rotates each pair (x_i, x_{i + H/2}) at position p by
  the angle p * 10000^(-i / (H/2)) (RoFormer eq. 34, GPT-NeoX layout),
  against a float64 reference; so <R_p q, R_m k> depends on p - m only."""
  from diffusion_text.models.layers import rotary
  b, length, n, h = 2, 9, 3, 8
  x = np.asarray(jax.random.normal(jax.random.key(0), (b, length, n, h)))
  half = h // 2
  theta = 10_000.0 ** (-np.arange(half) / half)
  ang = np.arange(length)[:, None] * theta                   # [L, H/2]
  cos, sin = np.cos(ang)[None, :, None], np.sin(ang)[None, :, None]
  x1, x2 = x[..., :half].astype(np.float64), x[..., half:].astype(np.float64)
  want = np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)
  got = np.asarray(rotary(jnp.asarray(x)))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # relative positions: the same q and k at every position
  q = np.broadcast_to(x[:1, :1], (1, length, n, h))
  k = np.broadcast_to(x[1:2, :1], (1, length, n, h))
  rq, rk = (np.asarray(rotary(jnp.asarray(a)), np.float64) for a in (q, k))
  dots = np.einsum("plnh,pmnh->lmn", rq, rk)                 # [L, L, N]
  for shift in range(-2, 3):
    diag = np.stack([dots[i, i + shift] for i in range(max(0, -shift),
                                                        min(length, length - shift))])
    np.testing.assert_allclose(diag, np.broadcast_to(diag[:1], diag.shape),
                               rtol=1e-4, atol=1e-4)



def test_output_head_is_a_zero_linear_with_its_kernel_stored_out_by_in():
  """`layers.OutputHead`: kernel [out, in] and bias start at zero, x maps to
  x @ kernel.T + bias over the last axis with the gradients of that map,
  and it draws the same parameter keys as the `nnx.Linear` it replaces
  (later parameters keep their initial values)."""
  from diffusion_text.models.layers import OutputHead
  r_head, r_linear = nnx.Rngs(0), nnx.Rngs(0)
  head = OutputHead(5, 7, dtype=jnp.float32, rngs=r_head)
  nnx.Linear(5, 7, kernel_init=nnx.initializers.zeros, rngs=r_linear)
  assert head.kernel.shape == (7, 5) and head.bias.shape == (7,)
  assert not np.any(head.kernel[...]) and not np.any(head.bias[...])
  np.testing.assert_array_equal(jax.random.key_data(r_head.params()),
                                jax.random.key_data(r_linear.params()))
  ks = jax.random.split(jax.random.key(1), 3)
  head.kernel[...] = jax.random.normal(ks[0], (7, 5))
  head.bias[...] = jax.random.normal(ks[1], (7,))
  x = jax.random.normal(ks[2], (2, 3, 5))
  want = (np.asarray(x, np.float64) @ np.asarray(head.kernel[...]).T
          + np.asarray(head.bias[...]))
  np.testing.assert_allclose(head(x), want, rtol=1e-5, atol=1e-5)
  # The VJP of its matmul `chunk_logits` (the bias gradient is a
  # ones-vector matmul, `column_sums`): d bias = the cotangent summed over
  # positions, d kernel = g^T x.
  g = np.asarray(jax.random.normal(jax.random.key(2), (2, 3, 7)), np.float64)
  g2, x2 = g.reshape(6, 7), np.asarray(x, np.float64).reshape(6, 5)
  for dtype, tol in ((jnp.float32, 1e-5), (jnp.bfloat16, 3e-2)):
    _, vjp = jax.vjp(lambda k, b: chunk_logits(x.reshape(6, 5), k, b, dtype),
                     head.kernel[...], head.bias[...])
    dk, db = vjp(jnp.asarray(g2, jnp.float32))
    assert dk.dtype == db.dtype == jnp.float32
    np.testing.assert_allclose(db, g2.sum(0), rtol=tol, atol=tol)
    np.testing.assert_allclose(dk, g2.T @ x2, rtol=tol, atol=tol)


def test_time_conditioning_changes_output():
  spec = spec_for("tokens", "logits")
  model = perturb(build_model(spec, CFG, seed=0))
  x = inputs(spec)
  early = model(x, jnp.full((B,), 0.1))
  late = model(x, jnp.full((B,), 0.9))
  assert np.abs(early - late).mean() > 1e-2 * np.abs(early).mean()
  # Per-example times: example 0 only sees its own t.
  mixed = model(x, jnp.array([0.1, 0.9]))
  np.testing.assert_allclose(mixed[0], early[0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(mixed[1], late[1], rtol=1e-5, atol=1e-5)


def test_learned_gamma_monotone_with_fixed_endpoints():
  spec = spec_for("latents", "vector", learned_schedule=True,
                  gamma_range=(-7.0, 5.0))
  init = as_denoiser(build_model(spec, CFG, seed=0)).gamma
  trained = as_denoiser(perturb(build_model(spec, CFG, seed=0),
                                scale=3.0)).gamma
  t_N = jnp.linspace(0.0, 1.0, 101)
  for gamma in (init, trained):
    g_N = gamma(t_N)
    assert g_N.shape == (101,)
    assert np.all(np.diff(np.asarray(g_N)) > 0)
    np.testing.assert_allclose(gamma(jnp.array([0.0, 1.0])), [-7.0, 5.0],
                               rtol=1e-5, atol=1e-5)
  # Initialised to (nearly) the straight line between the endpoints.
  np.testing.assert_allclose(init(t_N), -7.0 + 12.0 * t_N, atol=0.05)
  assert np.abs(trained(t_N) - (-7.0 + 12.0 * t_N)).max() > 0.05


def test_embedding_and_tied_rounding():
  spec = spec_for("latents", "vector", embed_vocab=V)
  denoiser = as_denoiser(build_model(spec, CFG, seed=0))
  ids = jax.random.randint(jax.random.key(0), (B, L), 0, V)
  e_BxLxD = denoiser.embed(ids)
  assert e_BxLxD.shape == (B, L, D)
  table_VxD = denoiser.embed(jnp.arange(V)[None])[0]
  np.testing.assert_allclose(np.std(table_VxD), 1.0, atol=0.35)
  logits_BxLxV = denoiser.round_logits(e_BxLxD)
  np.testing.assert_allclose(logits_BxLxV, e_BxLxD @ table_VxD.T, rtol=1e-5,
                             atol=1e-5)


def test_fused_rounding_nll_is_the_dense_cross_entropy_in_value_and_grad():
  """Denoiser.round_nll equals the cross-entropy of round_logits, in value
  and in the gradient of the table and of x (and is absent unfused)."""
  from diffusion_text.contract import cross_entropy
  spec = spec_for("latents", "vector", embed_vocab=V)
  graphdef, params = nnx.split(build_model(spec, CFG, seed=0))
  x = jax.random.normal(jax.random.key(1), (B, L, D))
  ids = jax.random.randint(jax.random.key(2), (B, L), 0, V)
  w = jax.random.normal(jax.random.key(3), (B, L))

  def total(params, x, fused):
    den = as_denoiser(nnx.merge(graphdef, params))
    nll = (den.round_nll(x, ids) if fused
           else cross_entropy(den.round_logits(x), ids))
    return jnp.sum(w * nll)

  want = jax.value_and_grad(total, (0, 1))(params, x, False)
  got = jax.jit(jax.value_and_grad(total, (0, 1)), static_argnums=2)(
      params, x, True)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4,
                                                       atol=1e-5), want, got)
  assert as_denoiser(nnx.merge(graphdef, params),
                     fused_loss=False).round_nll is None


def test_bfloat16_close_to_float32():
  spec = spec_for("tokens", "logits")
  x, t_B = inputs(spec), jnp.full((B,), 0.4)
  f32 = perturb(build_model(spec, CFG, seed=0))
  bf16 = perturb(build_model(spec, dataclasses.replace(CFG, dtype="bfloat16"),
                             seed=0))
  dtypes = {x.dtype for x in jax.tree.leaves(nnx.state(bf16, nnx.Param))}
  assert dtypes == {jnp.dtype(jnp.float32)}
  ref, out = f32(x, t_B), bf16(x, t_B)
  assert out.dtype == jnp.float32
  rel = np.abs(out - ref).max() / np.abs(ref).max()
  assert 0 < rel < 0.05


def _value_and_grad(model, x, t_B):
  graphdef, params = nnx.split(model)

  def loss(params):
    return jnp.mean(jnp.square(nnx.merge(graphdef, params)(x, t_B)))

  return jax.jit(jax.value_and_grad(loss))(params)


def test_remat_same_value_and_grad():
  spec = spec_for("latents", "vector")
  x, t_B = inputs(spec), jnp.full((B,), 0.4)
  plain = perturb(build_model(spec, CFG, seed=0))
  remat = perturb(build_model(spec, dataclasses.replace(CFG, remat=True),
                              seed=0))
  (v0, g0), (v1, g1) = _value_and_grad(plain, x, t_B), _value_and_grad(
      remat, x, t_B)
  np.testing.assert_allclose(v0, v1, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4,
                                                       atol=1e-6), g0, g1)


def test_scan_layers_matches_loop():
  spec = spec_for("tokens", "logits", causal=True)
  x, t_B = inputs(spec), jnp.full((B,), 0.7)
  loop = perturb(build_model(spec, CFG, seed=0))
  scan = build_model(spec, dataclasses.replace(CFG, scan_layers=True,
                                               remat=True), seed=0)
  assert count_params(scan) == count_params(loop)
  # Copy the loop model's parameters into the stacked layout.
  pure = nnx.to_pure_dict(nnx.state(loop, nnx.Param))
  blocks = pure.pop("blocks")
  pure["blocks"] = jax.tree.map(lambda *xs: jnp.stack(xs),
                                *[blocks[i] for i in range(CFG.num_layers)])
  state = nnx.state(scan, nnx.Param)
  nnx.replace_by_pure_dict(state, pure)
  nnx.update(scan, state)
  np.testing.assert_allclose(scan(x, t_B), loop(x, t_B), rtol=1e-5,
                             atol=1e-5)
  (v0, _), (v1, g1) = _value_and_grad(loop, x, t_B), _value_and_grad(
      scan, x, t_B)
  np.testing.assert_allclose(v0, v1, rtol=1e-5)
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(g1))


def test_selected_cross_entropy_matches_dense_value_and_grad():
  """Fused head + CE over packed chunks == logsumexp - target logit of the
  dense head at the selected rows (0 elsewhere), in value and gradient;
  several chunks, a partial last chunk, and no rows at all."""
  n, d, v = 23, 8, 13
  ks = jax.random.split(jax.random.key(0), 5)
  h, w = jax.random.normal(ks[0], (n, d)), jax.random.normal(ks[1], (v, d))
  b, g = jax.random.normal(ks[2], (v,)), jax.random.normal(ks[3], (n,))
  target = jax.random.randint(ks[4], (n,), 0, v)

  def dense(h, w, b, where):
    logits = h @ w.T + b  # the kernel is [V, D]
    tgt = jnp.take_along_axis(logits, target[:, None], -1)[:, 0]
    return jnp.where(where, jax.nn.logsumexp(logits, -1) - tgt, 0.0)

  def fused(h, w, b, where):
    return selected_cross_entropy(h, w, b, target, where, chunk=4)

  for where in [jnp.arange(n) % 3 == 1, jnp.ones(n, bool), jnp.zeros(n, bool)]:
    ref = dense(h, w, b, where)
    np.testing.assert_allclose(fused(h, w, b, where), ref, rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(fused(h, w, b, where))[~np.asarray(where)] == 0)
    grads = [jax.grad(lambda *a, f=f: jnp.sum(g * f(*a, where)),
                      argnums=(0, 1, 2))(h, w, b) for f in (dense, fused)]
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4,
                                                         atol=1e-5), *grads)


def test_target_nll_is_the_heads_cross_entropy_where_selected():
  spec = spec_for("tokens", "logits")
  model = perturb(build_model(spec, CFG, seed=0))
  graphdef, params = nnx.split(model)
  x, t_B = inputs(spec), jnp.full((B,), 0.3)
  target = jax.random.randint(jax.random.key(3), (B, L), 0, V)
  where = jax.random.bernoulli(jax.random.key(4), 0.5, (B, L))

  def dense(params):
    logits = nnx.merge(graphdef, params)(x, t_B)
    tgt = jnp.take_along_axis(logits, target[..., None], -1)[..., 0]
    return jnp.where(where, jax.nn.logsumexp(logits, -1) - tgt, 0.0)

  def fused(params):
    return nnx.merge(graphdef, params).target_nll(x, t_B, target, where)

  def total(params, f):
    ce = f(params)
    return jnp.sum(ce * (1.0 + where)), ce

  ((_, ce0), g0), ((_, ce1), g1) = (jax.jit(jax.value_and_grad(
      functools.partial(total, f=f), has_aux=True))(params)
                                    for f in (dense, fused))
  np.testing.assert_allclose(ce1, ce0, rtol=1e-5, atol=1e-5)
  grads = [g0, g1]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4,
                                                       atol=1e-6), *grads)


def test_map_logits_is_fn_of_the_dense_logits_in_value_and_grad(monkeypatch):
  """The chunked head (contract.map_rows: several chunks, a padded last
  one) gives fn of the dense logits, in value and in the gradients of the
  parameters, of float rows and of an array fn closes over; integer rows
  and rows of any trailing shape travel with their positions."""
  from diffusion_text import contract
  monkeypatch.setattr(contract, "ROW_CHUNK", 3)  # B * L = 16: 6 chunks
  spec = spec_for("tokens", "logits")
  model = perturb(build_model(spec, CFG, seed=0))
  graphdef, params = nnx.split(model)
  x, t_B = inputs(spec), jnp.full((B,), 0.3)
  target = jax.random.randint(jax.random.key(3), (B, L), 0, V)
  shift = jax.random.normal(jax.random.key(4), (B, L, 2))
  scale_V = jax.random.normal(jax.random.key(5), (V,))

  def fn_of(scale_V):
    def fn(logits_NxV, rows):
      target_N, shift_Nx2 = rows
      logits_NxV = logits_NxV * scale_V  # a closed-over, differentiable array
      lse_N = jax.nn.logsumexp(logits_NxV, -1)
      tgt_N = jnp.take_along_axis(logits_NxV, target_N[:, None], -1)[:, 0]
      soft_N = jnp.sum(jax.nn.softplus(logits_NxV + shift_Nx2[:, :1]), -1)
      return lse_N - tgt_N, soft_N[:, None] * shift_Nx2
    return fn

  def dense(params, shift, scale_V):
    logits = nnx.merge(graphdef, params)(x, t_B).reshape(B * L, V)
    a, b = fn_of(scale_V)(logits, (target.reshape(-1),
                                   shift.reshape(B * L, 2)))
    return a.reshape(B, L), b.reshape(B, L, 2)

  def chunked(params, shift, scale_V):
    return nnx.merge(graphdef, params).map_logits(x, t_B, fn_of(scale_V),
                                                  (target, shift))

  def total(params, shift, scale_V, f):
    a, b = f(params, shift, scale_V)
    return jnp.sum(a) + jnp.sum(jnp.sin(b)), (a, b)

  (_, out0), g0 = jax.jit(jax.value_and_grad(
      functools.partial(total, f=dense), (0, 1, 2), has_aux=True))(
          params, shift, scale_V)
  (_, out1), g1 = jax.jit(jax.value_and_grad(
      functools.partial(total, f=chunked), (0, 1, 2), has_aux=True))(
          params, shift, scale_V)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                       atol=1e-5), out0, out1)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4,
                                                       atol=1e-5), g0, g1)
  assert np.abs(np.asarray(g1[2])).max() > 0  # the closure's gradient


def _ce_and_lse_case(seed, n, d=8, v=13):
  """A head (h [n, d], w, b), targets, every third row unselected, the dense
  (CE, logsumexp) at the selected rows and two random [n] vectors."""
  ks = jax.random.split(jax.random.key(seed), 6)
  h, w = jax.random.normal(ks[0], (n, d)), jax.random.normal(ks[1], (v, d))
  b, target = jax.random.normal(ks[2], (v,)), jax.random.randint(
      ks[3], (n,), 0, v)
  where = jnp.arange(n) % 3 != 0

  def dense(h, w, b):
    logits = h @ w.T + b
    lse = jax.nn.logsumexp(logits, -1)
    ce = lse - jnp.take_along_axis(logits, target[:, None], -1)[:, 0]
    return jnp.where(where, ce, 0.0), jnp.where(where, lse, 0.0)

  vectors = (jax.random.uniform(ks[4], (n,)), jax.random.normal(ks[5], (n,)))
  return h, w, b, target, where, dense, vectors


def test_selected_ce_and_lse_gradient_of_both_outputs():
  """The fused head's logsumexp output is the dense one at the selected
  rows, and a loss using both outputs has the dense gradient."""
  from diffusion_text.models.cross_entropy import selected_ce_and_lse
  h, w, b, target, where, dense, (g1, g2) = _ce_and_lse_case(1, 19)

  def fused(h, w, b):
    return selected_ce_and_lse(h, w, b, target, where, chunk=4)

  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5,
                                                       atol=1e-5),
               dense(h, w, b), fused(h, w, b))
  grads = [jax.grad(lambda *a, f=f: jnp.sum(g1 * f(*a)[0] + g2 * jnp.exp(
      0.1 * f(*a)[1])), argnums=(0, 1, 2))(h, w, b) for f in (dense, fused)]
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4,
                                                       atol=1e-5), *grads)


def _assert_same_value_and_grad(out, ref):
  """(value, grads) pairs agree to float32 tolerance."""
  np.testing.assert_allclose(out[0], ref[0], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4,
                                                       atol=1e-5),
               out[1], ref[1])


def test_selected_ce_weights_fold_the_gradient_into_the_forward(monkeypatch):
  """With `weights`, the gradient formed in the forward pass equals the
  dense one whenever the objective applies those weights (any common
  factor, CE and logsumexp both weighted, rows off `where` ignored); with
  other cotangents the backward recomputes, still exactly, and warns."""
  from diffusion_text.models.cross_entropy import selected_ce_and_lse
  recomputes = count_recomputes(monkeypatch)
  n = 23
  h, w, b, target, where, dense, (a_ce, a_lse) = _ce_and_lse_case(2, n)

  def grads(f, weights):
    def objective(h, w, b):
      ce, lse = f(h, w, b, weights)
      return -2.5 * jnp.sum(a_ce * ce + a_lse * lse)
    out = jax.jit(jax.value_and_grad(objective, argnums=(0, 1, 2)))(h, w, b)
    jax.effects_barrier()
    return out

  def fused(h, w, b, weights):
    return selected_ce_and_lse(h, w, b, target, where, chunk=4,
                               weights=weights)

  ref = grads(lambda h, w, b, _: dense(h, w, b), None)
  off_where = jnp.where(where, 0.0, 7.0)  # rows off `where` do not count
  for weights, recomputed in [((3 * a_ce + off_where, 3 * a_lse), 0),
                              ((a_ce, jnp.zeros(n)), 1),
                              ((a_lse, a_ce), 1)]:
    del recomputes[:]
    out = grads(fused, weights)
    _assert_same_value_and_grad(out, ref)
    assert len(recomputes) == recomputed


@pytest.mark.parametrize("process", ["masked", "ar", "d3pm_absorbing",
                                     "d3pm_uniform", "gaussian_vlb"])
def test_process_losses_take_the_folded_gradient(process, monkeypatch):
  """The loss weights these processes pass to the fused head
  (`target_nll`) or the chunked head (`map_logits`) are the ones their
  objectives apply: differentiating the loss never falls back to the
  recomputing backward (padding included). sedd_uniform: in
  tests/test_sedd.py, with its chunked-versus-dense check."""
  from diffusion_text.processes import make_process
  recomputes = count_recomputes(monkeypatch)
  proc = make_process(process, vocab_size=V)
  spec = proc.model_spec
  model = perturb(build_model(spec, CFG, seed=0))
  graphdef, params = nnx.split(model)
  tokens = jax.random.randint(jax.random.key(1), (B, L), 0, V)
  mask = jnp.arange(L)[None, :] < jnp.array([[L], [L - 3]])

  def loss(params):
    return proc.loss(jax.random.key(2), as_denoiser(nnx.merge(graphdef, params)),
                     tokens, mask).loss

  jax.block_until_ready(jax.jit(jax.grad(loss))(params))
  jax.effects_barrier()
  assert recomputes == []


def test_map_logits_weights_fold_the_gradient(monkeypatch):
  """`map_logits(..., weights=...)`: with the objective's own weights the
  gradient formed in the forward pass (`models.folded`) equals the dense
  one, for the parameters, a float row and a closed-over array, with a
  padded last chunk; with other cotangents it recomputes exactly."""
  from diffusion_text import contract
  monkeypatch.setattr(contract, "ROW_CHUNK", 3)  # B * L = 16: 6 chunks
  recomputes = count_recomputes(monkeypatch)
  spec = spec_for("tokens", "logits")
  model = perturb(build_model(spec, CFG, seed=0))
  graphdef, params = nnx.split(model)
  x, t_B = inputs(spec), jnp.full((B,), 0.3)
  target = jax.random.randint(jax.random.key(3), (B, L), 0, V)
  shift = jax.random.normal(jax.random.key(4), (B, L))
  scale_V = jax.random.normal(jax.random.key(5), (V,))
  w1, w2 = jax.random.uniform(jax.random.key(6), (2, B, L))

  def fn_of(scale_V):
    def fn(logits_NxV, rows):
      target_N, shift_N = rows
      logits_NxV = logits_NxV * scale_V
      lse_N = jax.nn.logsumexp(logits_NxV, -1)
      tgt_N = jnp.take_along_axis(logits_NxV, target_N[:, None], -1)[:, 0]
      soft_N = jnp.sum(jax.nn.softplus(logits_NxV + shift_N[:, None]), -1)
      return lse_N - tgt_N, soft_N
    return fn

  def run(weights, objective):
    def total(params, shift, scale_V):
      a, b = nnx.merge(graphdef, params).map_logits(
          x, t_B, fn_of(scale_V), (target, shift), weights=weights)
      return objective(a, b)
    out = jax.jit(jax.value_and_grad(total, (0, 1, 2)))(params, shift, scale_V)
    jax.effects_barrier()
    return out

  linear = lambda a, b: 0.7 * jnp.sum(w1 * a + w2 * b)
  nonlinear = lambda a, b: jnp.sum(jnp.sin(a) + w2 * b)
  for objective, weights, recomputed in [(linear, (2 * w1, 2 * w2), 0),
                                         (nonlinear, (w1, w2), 1)]:
    del recomputes[:]
    ref = run(None, objective)
    out = run(weights, objective)
    _assert_same_value_and_grad(out, ref)
    assert len(recomputes) == recomputed
    assert np.abs(np.asarray(out[1][2])).max() > 0  # the closure's gradient
