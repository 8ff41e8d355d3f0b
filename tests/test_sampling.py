"""Tests for the one sampling loop, its prompt helpers and masked samplers."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import io_callback

from diffusion_text import sampling
from diffusion_text.processes import Denoiser, SamplingOptions, base
from diffusion_text.processes.masked import MaskedProcess
from tests.helpers import constant_logits

V, L, N = 8, 16, 64
PI = np.array([0.3, 0.2, 0.15, 0.1, 0.1, 0.08, 0.05, 0.02])


def masked_sampler(steps=8, num=N, length=L, options=SamplingOptions(),
                   **process_options):
  process = MaskedProcess(vocab_size=V, **process_options)
  return sampling.make_sampler(process, num, length, steps,
                               build_denoiser=constant_logits, options=options)


class CharTokenizer:
  """'a' -> 0, 'b' -> 1, ...; spaces are dropped."""

  def encode(self, text):
    return [ord(c) - ord("a") for c in text if c != " "]


def assert_matches(freq, probs, n):
  """Frequencies within 4.5 binomial standard errors of `probs`."""
  sem = np.sqrt(probs * (1 - probs) / n)
  assert np.all(np.abs(freq - probs) < 4.5 * sem + 1e-9), (freq, probs)


@pytest.mark.parametrize("float64", [False, True])
def test_masked_samples_are_valid_deterministic_and_follow_pi(float64):
  run = masked_sampler(options=SamplingOptions(float64=float64))
  log_pi = jnp.log(jnp.asarray(PI, jnp.float32))
  a = np.asarray(run(jax.random.key(0), log_pi))
  b = np.asarray(run(jax.random.key(0), log_pi))
  c = np.asarray(run(jax.random.key(1), log_pi))
  assert a.shape == (N, L) and a.dtype == np.int32
  np.testing.assert_array_equal(a, b)
  assert (a != c).any()
  assert a.min() >= 0 and a.max() < V  # in range, no [MASK] (= V) left
  both = np.concatenate([a, c]).ravel()
  assert_matches(np.bincount(both, minlength=V) / both.size, PI, both.size)


def test_prefix_and_infill_conditioning_keep_the_fixed_tokens():
  tok = CharTokenizer()
  run = masked_sampler()
  log_pi = jnp.log(jnp.asarray(PI, jnp.float32))
  cond, keep = sampling.prompt_condition(tok, "hgf", L)
  np.testing.assert_array_equal(cond[:3], [7, 6, 5])
  np.testing.assert_array_equal(keep, np.arange(L) < 3)
  out = np.asarray(run(jax.random.key(0), log_pi, cond, keep))
  np.testing.assert_array_equal(out[:, :3], np.broadcast_to([7, 6, 5], (N, 3)))
  assert out.min() >= 0 and out.max() < V

  cond, keep = sampling.infill_condition(tok, "hg ___ fh", L)
  expect_keep = np.zeros(L, bool)
  expect_keep[[0, 1, L - 2, L - 1]] = True
  np.testing.assert_array_equal(keep, expect_keep)
  out = np.asarray(run(jax.random.key(2), log_pi, cond, keep))
  np.testing.assert_array_equal(out[:, expect_keep],
                                np.broadcast_to([7, 6, 5, 7], (N, 4)))
  assert (out[:, 2:L - 2] != out[0, 2:L - 2]).any()  # the gap is generated


def test_infill_layout_rules():
  tok = CharTokenizer()
  cond, keep = sampling.infill_condition(tok, "a ___ b ___ c", 10)
  # free = 7 split as 4 + 3 (earlier gaps take the remainder); c ends it
  np.testing.assert_array_equal(np.flatnonzero(keep), [0, 5, 9])
  np.testing.assert_array_equal(cond[[0, 5, 9]], [0, 1, 2])
  cond, keep = sampling.infill_condition(tok, "a ___ b", 10, gap_lengths=[2])
  np.testing.assert_array_equal(np.flatnonzero(keep), [0, 3])  # rest is free
  with pytest.raises(ValueError, match="gap"):
    sampling.infill_condition(tok, "abc", 10)
  with pytest.raises(ValueError, match="length"):
    sampling.prompt_condition(tok, "abcdefgh", 4)


def test_cached_sampler_is_exact_with_fewer_network_calls():
  calls = []

  def count(x):
    calls.append(1)
    return np.float32(0.0)

  def build(logits_LxV):
    def predict(x, t, self_cond=None):
      zero = io_callback(count, jax.ShapeDtypeStruct((), jnp.float32), t[0])
      return jnp.broadcast_to(logits_LxV + zero, x.shape + (V,))
    return Denoiser(predict=predict)

  logits = jax.random.normal(jax.random.key(5), (4, V))
  steps = 32
  outs, num_calls = {}, {}
  for name in ("ancestral", "cached"):
    process = MaskedProcess(vocab_size=V)
    run = sampling.make_sampler(process, 2, 4, steps, build_denoiser=build,
                                options=SamplingOptions(sampler=name))
    calls.clear()
    outs[name] = np.asarray(run(jax.random.key(7), logits))
    num_calls[name] = len(calls)
  np.testing.assert_array_equal(outs["cached"], outs["ancestral"])
  assert num_calls["ancestral"] == steps
  # 8 tokens unmask on at most 8 of 32 steps; a call follows each change.
  assert 1 <= num_calls["cached"] <= 9


def test_temperature_to_zero_gives_the_argmax():
  logits = jax.random.normal(jax.random.key(3), (L, V)) * 2.0
  argmax = np.asarray(jnp.argmax(logits, -1))
  # (the closest top-two gap is 0.002: at 1e-4 the runner-up has e^-20)
  for temperature in (0.0, 1e-4):
    run = masked_sampler(num=8,
                         options=SamplingOptions(temperature=temperature))
    out = np.asarray(run(jax.random.key(0), logits))
    np.testing.assert_array_equal(out, np.broadcast_to(argmax, (8, L)))


def test_top_p_removes_the_tail():
  probs = np.array([0.4, 0.3, 0.2, 0.04, 0.03, 0.02, 0.007, 0.003])
  run = masked_sampler(options=SamplingOptions(top_p=0.8))
  out = np.asarray(run(jax.random.key(0), jnp.log(jnp.asarray(probs)))).ravel()
  # the nucleus is the smallest head with mass >= 0.8: tokens 0, 1, 2
  assert set(np.unique(out)) == {0, 1, 2}
  kept = probs[:3] / probs[:3].sum()
  assert_matches(np.bincount(out, minlength=3)[:3] / out.size, kept, out.size)


@dataclasses.dataclass(frozen=True)
class CountingProcess(base.Process):
  """Adds 1 per reverse step: checks the loop's grid, steps and impose."""

  num_steps: int = 5

  @property
  def model_spec(self):
    raise NotImplementedError

  def sample_time(self, key, batch):
    raise NotImplementedError

  def corrupt(self, key, x0, t):
    raise NotImplementedError

  def loss(self, key, denoiser, tokens, mask):
    raise NotImplementedError

  def nll_bound(self, key, denoiser, tokens, mask):
    raise NotImplementedError

  def prior(self, key, shape):
    return jnp.zeros(shape, jnp.int32)

  def reverse_step(self, key, denoiser, x_t, t, s,
                   options=SamplingOptions()):
    return x_t + 1 + 100 * (s < 0).astype(jnp.int32)  # s never below 0

  def decode(self, denoiser, x0, options=SamplingOptions()):
    return x0


def test_loop_runs_every_step_and_imposes_after_each():
  process = CountingProcess(vocab_size=V)
  den = Denoiser(predict=None)
  out = sampling.sample(jax.random.key(0), process, den, 3, 6)
  np.testing.assert_array_equal(out, 5)  # default steps = process.num_steps
  cond = jnp.array([7, 0, 0, 0, 0, 9])
  keep = jnp.array([1, 0, 0, 0, 0, 1], bool)
  out = sampling.sample(jax.random.key(0), process, den, 3, 6, steps=3,
                        cond_tokens=cond, cond_mask=keep)
  np.testing.assert_array_equal(out, np.broadcast_to([7, 3, 3, 3, 3, 9], (3, 6)))


def test_time_unconditioned_network_makes_caching_exact():
  # A network whose output depends on t: caching reuses stale predictions
  # unless the process stops feeding it t (time_conditioning=False).
  logits = jax.random.normal(jax.random.key(5), (4, V))
  seen_t = []

  def build(logits_LxV):
    def predict(x, t, self_cond=None):
      seen_t.append(t)
      return jnp.broadcast_to(logits_LxV * (1.0 + 3.0 * t[:, None, None]),
                              x.shape + (V,))
    return Denoiser(predict=predict)

  outs = {}
  for name in ("ancestral", "cached"):
    process = MaskedProcess(vocab_size=V, time_conditioning=False)
    run = sampling.make_sampler(process, 8, 4, 32, build_denoiser=build,
                                options=SamplingOptions(sampler=name))
    outs[name] = np.asarray(run(jax.random.key(11), logits))
  np.testing.assert_array_equal(outs["cached"], outs["ancestral"])

  # The bound, too, evaluates the network at t = 0.
  p = MaskedProcess(vocab_size=V, time_conditioning=False)
  tokens = jnp.zeros((2, 4), jnp.int32)
  seen_t.clear()
  jax.jit(lambda k: p.nll_bound(k, build(logits), tokens,
                                jnp.ones_like(tokens)).nats)(jax.random.key(0))
  assert seen_t  # traced
  fixed = p.nll_bound(jax.random.key(0), constant_logits(logits), tokens,
                      jnp.ones_like(tokens)).nats
  got = p.nll_bound(jax.random.key(0), build(logits), tokens,
                    jnp.ones_like(tokens)).nats
  np.testing.assert_allclose(got, fixed, rtol=1e-6)


def test_gaussian_decode_takes_the_nearest_embedding():
  # The largest dot product would send embedding 0 = (1, 0) to 1 = (2, 0).
  from diffusion_text.processes import make_process
  table = jnp.array([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
  p = make_process("gaussian", vocab_size=4, latent_dim=2)
  den = Denoiser(predict=None, embed=lambda ids: table[ids])
  ids = jnp.array([[0, 1, 2, 3]])
  np.testing.assert_array_equal(p.decode(den, table[ids]), [[0, 1, 2, 3]])
  # Off the table: (1.4, 0) is nearer to (1, 0) than to (2, 0).
  x = jnp.array([[[1.4, 0.0], [1.6, 0.1], [0.1, 0.4], [0.2, -3.0]]])
  np.testing.assert_array_equal(p.decode(den, x), [[0, 1, 2, 3]])


def test_top_k_keeps_the_k_likeliest():
  probs = np.array([0.05, 0.4, 0.3, 0.1, 0.05, 0.05, 0.03, 0.02])
  run = masked_sampler(options=SamplingOptions(top_k=2))
  out = np.asarray(run(jax.random.key(0), jnp.log(jnp.asarray(probs)))).ravel()
  assert set(np.unique(out)) == {1, 2}
  kept = probs[1:3] / probs[1:3].sum()
  assert_matches(np.bincount(out, minlength=3)[1:3] / out.size, kept, out.size)
  with pytest.raises(ValueError, match="top_k"):
    SamplingOptions(top_k=-1)


@pytest.mark.parametrize("float64", [False, True])
def test_draws_follow_the_law_across_blocks_and_only_where_asked(float64):
  from diffusion_text.processes import draws
  # 300 classes span three blocks of the two-level draw; a tail class of
  # mass 1e-3 in the last block must keep its share.
  v, n = 300, 20000
  probs = np.full(v, 1e-3 * 0.5 / 298)
  probs[[3, 150, 299]] = [0.3, 0.2 - 1e-3 + 1e-3 * 0.5, 1e-3]
  probs[0] = 1.0 - probs.sum() + probs[0]
  options = SamplingOptions(float64=float64)
  logits = jnp.broadcast_to(jnp.log(jnp.asarray(probs, jnp.float32)), (n, v))
  # The logits are an argument, not a closed-over constant that XLA would
  # fold at compile time (seconds).
  ids = np.asarray(jax.jit(lambda k, l: draws.draw(k, l, options))(
      jax.random.key(0), logits))
  for c in (0, 3, 150, 299):
    assert_matches(np.mean(ids == c), probs[c], n)
  # draw_where: the gathered and the everywhere path agree position by
  # position (per-position uniforms), and nothing is drawn off `where`.
  logits_BxLxV = jax.random.normal(jax.random.key(1), (4, 32, v))
  few = jax.random.uniform(jax.random.key(2), (4, 32)) < 0.1
  got = draws.draw_where(jax.random.key(3), logits_BxLxV, few, options)
  ref = draws.draw_where(jax.random.key(3), logits_BxLxV, few, options,
                         capacity=128)
  np.testing.assert_array_equal(got, ref)
  assert (np.asarray(got)[~np.asarray(few)] == 0).all()
  # stay_or_move: the law of the weights with the current state included
  # (it stays w.p. w[current] / sum w, the rest drawn among the others).
  w = np.array([0.5, 0.0, 2.0, 1.5, 1.0], np.float32)
  x = jnp.full((n, 1), 2, jnp.int32)
  moved = np.asarray(jax.jit(lambda k, x: draws.stay_or_move(
      k, jnp.broadcast_to(jnp.asarray(w), (n, 1, 5)), x, float64))(
          jax.random.key(4), x))[:, 0]
  for c in range(5):
    assert_matches(np.mean(moved == c), w[c] / w.sum(), n)
  # Few movers (gathered) and every row (capacity n) agree row by row; a
  # state whose weight is the whole mass never moves.
  w_BxLxK = jax.random.uniform(jax.random.key(5), (4, 32, v))
  current = jax.random.randint(jax.random.key(6), (4, 32), 0, v)
  w_BxLxK = jnp.where(jnp.arange(v) == current[..., None],
                      jnp.where(few, 0.05, 1e4)[..., None], w_BxLxK)
  w_BxLxK = w_BxLxK.at[0, 0].set(jnp.zeros(v).at[current[0, 0]].set(1.0))
  got = draws.stay_or_move(jax.random.key(7), w_BxLxK, current, float64)
  ref = draws.stay_or_move(jax.random.key(7), w_BxLxK, current, float64,
                           capacity=128)
  np.testing.assert_array_equal(got, ref)
  assert int(got[0, 0]) == int(current[0, 0])
  assert 0 < int(jnp.sum(got != current)) <= 64


@pytest.mark.parametrize("name", MaskedProcess.SAMPLERS)
def test_every_masked_sampler_fills_everything_and_compiles_once(name):
  traces = []
  logits = jax.random.normal(jax.random.key(4), (L, V)) * 2.0

  def build(logits_LxV):
    traces.append(1)
    return constant_logits(logits_LxV)

  process = MaskedProcess(vocab_size=V)
  run = sampling.make_sampler(process, 8, L, 8, build_denoiser=build,
                              options=SamplingOptions(sampler=name))
  a = np.asarray(run(jax.random.key(0), logits))
  b = np.asarray(run(jax.random.key(0), logits))
  c = np.asarray(run(jax.random.key(1), logits + 0.0))
  assert len(traces) == 1  # one compile for this (shape, steps)
  np.testing.assert_array_equal(a, b)
  assert a.min() >= 0 and a.max() < V and c.max() < V  # no [MASK] left
  # Temperature 0: every position takes its argmax, whatever the order.
  run0 = sampling.make_sampler(
      process, 2, L, 8, build_denoiser=constant_logits,
      options=SamplingOptions(sampler=name, temperature=0.0))
  np.testing.assert_array_equal(run0(jax.random.key(0), logits),
                                np.broadcast_to(np.argmax(logits, -1), (2, L)))


def test_confidence_sampler_unmasks_the_most_confident_first():
  # Position 0 is certain, the rest are uniform: with one token unmasked
  # per step, the first step must pick position 0.
  logits = jnp.zeros((4, V)).at[0, 3].set(20.0)
  process = MaskedProcess(vocab_size=V)
  x_T = jnp.full((2, 4), V, jnp.int32)
  x_s = process.reverse_step(jax.random.key(0), constant_logits(logits), x_T,
                             jnp.float32(1.0), jnp.float32(0.75),
                             SamplingOptions(sampler="confidence"))
  np.testing.assert_array_equal(x_s, [[3, V, V, V], [3, V, V, V]])


@pytest.mark.parametrize("sampler", ["ancestral", "confidence"])
def test_semi_autoregressive_blocks_fill_left_to_right(sampler):
  process = MaskedProcess(vocab_size=V)
  options = SamplingOptions(sampler=sampler, block_length=4)
  logits = jnp.log(jnp.asarray(PI, jnp.float32))
  x = jnp.full((16, L), V, jnp.int32)
  steps = 8  # 4 blocks of 4 positions, 2 steps each
  grid = np.linspace(1.0, 0.0, steps + 1)
  for i in range(steps):
    x = process.reverse_step(jax.random.fold_in(jax.random.key(0), i),
                             constant_logits(logits), x,
                             jnp.float32(grid[i]), jnp.float32(grid[i + 1]),
                             options)
    done_blocks = (i + 1) // 2
    filled = np.asarray(x != V)
    assert filled[:, :4 * done_blocks].all(), (i, filled)  # blocks done
    assert not filled[:, 4 * (done_blocks + (i % 2 == 0)):].any(), i  # waiting
  out = np.asarray(sampling.make_sampler(process, 4, L, steps,
                                         build_denoiser=constant_logits,
                                         options=options)(jax.random.key(1),
                                                          logits))
  assert out.min() >= 0 and out.max() < V
  with pytest.raises(ValueError, match="block_length"):
    SamplingOptions(block_length=-1)


def test_gaussian_step_skipping_uses_trained_times():
  from diffusion_text.processes import make_process
  p = make_process("gaussian", vocab_size=4, latent_dim=2, num_steps=1000)
  grid = np.asarray(p.time_grid(7, 16)) * 1000
  np.testing.assert_allclose(grid, np.round(grid), atol=1e-3)
  assert grid[0] == 1000 and grid[-1] == 0 and np.all(np.diff(grid) < 0)
  with pytest.raises(ValueError, match="num_steps"):
    p.time_grid(1001, 16)


@pytest.mark.parametrize("name", ["remdm_cap", "remdm_rescale"])
def test_remdm_remasks_and_reduces_to_ancestral_at_eta_zero(name):
  logits = jax.random.normal(jax.random.key(6), (L, V))
  outs = {}
  for label, options in (
      ("ancestral", SamplingOptions()),
      ("eta0", SamplingOptions(sampler=name, remask_eta=0.0)),
      ("remdm", SamplingOptions(sampler=name, remask_eta=0.5))):
    outs[label] = np.asarray(masked_sampler(steps=16, num=16,
                                            options=options)(
                                                jax.random.key(9), logits))
  np.testing.assert_array_equal(outs["eta0"], outs["ancestral"])
  assert outs["remdm"].min() >= 0 and outs["remdm"].max() < V  # no [MASK]
  assert (outs["remdm"] != outs["ancestral"]).any()
  # A step from a fully unmasked state remasks about sigma of the tokens.
  process = MaskedProcess(vocab_size=V)
  x = jnp.zeros((64, L), jnp.int32)
  x_s = process.reverse_step(jax.random.key(0), constant_logits(logits), x,
                             jnp.float32(0.5), jnp.float32(0.25),
                             SamplingOptions(sampler=name, remask_eta=0.5))
  sigma = 0.5 if name == "remdm_cap" else 0.5 * min(1.0, 0.25 / 0.5)
  assert abs(float(np.mean(np.asarray(x_s) == V)) - sigma) < 0.05


def test_remdm_loop_clock_holds_alpha_on_and_keeps_the_marginals():
  from diffusion_text.processes import masked_samplers
  options = SamplingOptions(sampler="remdm_loop", remask_eta=0.3)
  t = jnp.linspace(1.0, 0.0, 101)
  a = np.asarray(masked_samplers.loop_alpha(t, options))
  assert a[0] == 0.0 and a[-1] == 1.0 and np.all(np.diff(a) >= -1e-7)
  inside = (np.asarray(t) <= 0.55) & (np.asarray(t) >= 0.05)
  np.testing.assert_allclose(a[inside], 0.9, atol=1e-6)
  # The network sees the process time of the loop's noise level.
  for schedule in ("linear", "cosine_alpha"):
    process = MaskedProcess(vocab_size=V, schedule=schedule)
    for level in (0.1, 0.5, 0.9):
      t_net = masked_samplers.time_of_alpha(process, jnp.float32(level))
      assert abs(float(process.alpha(t_net)) - level) < 1e-5
  # A constant-logit model is a product law: remasking redraws from the same
  # law, so the loop must still give each token law pi, with no [MASK] left.
  log_pi = jnp.log(jnp.asarray(PI, jnp.float32))
  run = masked_sampler(steps=32, num=256, options=options)
  out = np.asarray(run(jax.random.key(3), log_pi))
  assert out.min() >= 0 and out.max() < V
  assert_matches(np.bincount(out.ravel(), minlength=V) / out.size, PI,
                 out.size)
  # ... and the held window really remasks: one step inside it from a
  # fully unmasked state remasks sigma = min(eta, sigma_max) of the tokens,
  # sigma_max = (1 - alpha_on) / alpha_on.
  process = MaskedProcess(vocab_size=V)
  x = jnp.zeros((64, L), jnp.int32)
  x_s = process.reverse_step(jax.random.key(0), constant_logits(log_pi), x,
                             jnp.float32(0.3), jnp.float32(0.25), options)
  sigma = min(0.3, 0.1 / 0.9)
  assert abs(float(np.mean(np.asarray(x_s) == V)) - sigma) < 0.03
  with pytest.raises(ValueError, match="remask_t_off < remask_t_on"):
    SamplingOptions(remask_t_on=0.1, remask_t_off=0.2)
