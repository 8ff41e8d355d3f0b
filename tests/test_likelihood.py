"""The evaluator's statistics: ratio estimator, SEM, bits and perplexity."""

import math

import numpy as np

from diffusion_text.eval import likelihood


def test_constant_per_token_rate_has_zero_sem():
  tokens = np.array([64, 64, 30, 64])
  nats = 2.5 * tokens
  r = likelihood.summarize(nats, tokens, {"diffusion": nats})
  assert math.isclose(r["nats_per_token"], 2.5)
  assert r["nats_per_token_sem"] < 1e-12
  assert math.isclose(r["bits_per_token"], 2.5 / math.log(2))
  assert math.isclose(r["perplexity"], math.exp(2.5))
  assert math.isclose(r["terms"]["diffusion"], 2.5)


def test_ratio_estimator_and_sem_match_direct_formulas():
  rng = np.random.default_rng(0)
  tokens = np.full(200, 32)
  nats = rng.normal(3.0, 0.2, size=200) * tokens
  r = likelihood.summarize(nats, tokens, {})
  per_block = nats / tokens
  # Equal-length blocks: the ratio estimator is the plain mean and its SEM
  # the usual standard error of the mean.
  assert math.isclose(r["nats_per_token"], per_block.mean(), rel_tol=1e-12)
  assert math.isclose(r["nats_per_token_sem"],
                      per_block.std(ddof=1) / math.sqrt(200), rel_tol=1e-9)
  assert math.isclose(r["perplexity_sem"],
                      math.exp(per_block.mean()) * r["nats_per_token_sem"])


def test_empty_blocks_are_ignored():
  r = likelihood.summarize(np.array([10.0, 0.0, 20.0]), np.array([5, 0, 10]),
                           {})
  assert r["num_blocks"] == 2 and r["num_tokens"] == 15
  assert math.isclose(r["nats_per_token"], 2.0)


# ---- estimators: stratified times, adaptive K, heavy-tail warning ----------
import dataclasses

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from diffusion_text.config import ModelConfig
from diffusion_text.models import build_model
from diffusion_text.processes import base


@dataclasses.dataclass(frozen=True)
class _ToyBound:
  """A bound whose per-token integrand g(t) = (a + 1) t^a has mean exactly 1
  (a = 2: light-tailed; a = -0.9: infinite variance, heavy-tailed).

  Times are drawn antithetically over the batch, as the diffusion processes
  draw them, so the evaluator's stratified mode applies to it unchanged.
  """
  vocab_size: int = 4
  power: float = 2.0

  @property
  def model_spec(self):
    return base.ModelSpec(input="tokens", output="logits", output_dim=4,
                          input_vocab=4)

  def nll_bound(self, key, denoiser, tokens, mask):
    del denoiser
    b = tokens.shape[0]
    t_B = jnp.mod(jax.random.uniform(key, ()) + jnp.arange(b) / b, 1.0)
    n_B = mask.sum(-1).astype(jnp.float32)
    return base.make_bound({"diffusion": (self.power + 1) * t_B ** self.power * n_B})


@pytest.fixture(scope="module")
def toy():
  return _toy_run(_ToyBound())


@pytest.fixture(scope="module")
def heavy_toy():
  return _toy_run(_ToyBound(power=-0.9))


def _toy_run(process):
  model = build_model(process.model_spec,
                      ModelConfig(num_layers=1, d_model=8, num_heads=1,
                                  mlp_ratio=1, cond_dim=4), seed=0)
  graphdef, params = nnx.split(model)
  batches = [{"tokens": np.zeros((16, 8), np.int32),
              "mask": np.ones((16, 8), bool)} for _ in range(8)]
  def run(log=lambda m: None, **kw):
    return likelihood.evaluate(process, graphdef, params, batches, log=log,
                               **kw)
  return run


def test_stratified_times_are_unbiased_and_sharper(toy):
  ind = toy(mc_samples=8, time_sampling="independent")
  strat = toy(mc_samples=8, time_sampling="stratified")
  for r in (ind, strat):
    assert abs(r["nats_per_token"] - 1.0) < 4 * r["nats_per_token_sem"] + 1e-3
  # One systematic draw over K strata: for a smooth integrand the variance
  # falls like 1/K^2 instead of 1/K (SEM ratio sqrt(8) here).
  assert strat["nats_per_token_sem"] < ind["nats_per_token_sem"] / 2


def test_adaptive_k_reaches_the_target_mc_error(toy):
  fixed = toy(mc_samples=2)
  adaptive = toy(mc_samples=2, target_sem=0.03, max_mc_samples=512)
  assert fixed["mc_sem"] > 0.03
  assert adaptive["mc_sem"] <= 0.03
  assert adaptive["mc_samples_per_block"] > 2
  assert abs(adaptive["nats_per_token"] - 1.0) < 4 * adaptive["nats_per_token_sem"]
  # Var(3 t^2) = 4/5; a block of 8 tokens needs K >= 0.8 / (8 * 0.03)^2 / ...
  # i.e. in per-token units K >= 0.8 / 0.03^2 ~ 889 draws: capped at 512.
  capped = toy(mc_samples=2, target_sem=0.001, max_mc_samples=16)
  assert capped["mc_samples_per_block"] == 16


def test_heavy_tail_is_flagged_and_warned():
  rng = np.random.default_rng(0)
  tokens = np.full(400, 64)
  nats = rng.normal(2.65, 0.1, 400) * tokens
  assert not likelihood.summarize(nats, tokens, {})["tail"]["heavy_tailed"]
  nats[7] = 556.0 * 64  # the draw seen from sedd_uniform
  tail = likelihood.summarize(nats, tokens, {})["tail"]
  assert tail["heavy_tailed"] and tail["largest_block_share"] > 0.3
  # Few blocks: each holds > 1% by itself, which is not a tail.
  few = likelihood.summarize(nats[:10] * 0 + 2.6 * 64, tokens[:10], {})
  assert not few["tail"]["heavy_tailed"]


def test_heavy_tail_warning_is_printed(toy, heavy_toy):
  quiet, loud = [], []
  assert not toy(mc_samples=1, log=quiet.append)["tail"]["heavy_tailed"]
  assert heavy_toy(mc_samples=1, log=loud.append)["tail"]["heavy_tailed"]
  assert not any("heavy-tailed" in m for m in quiet)
  assert any("heavy-tailed" in m and "eval.target_sem" in m for m in loud)


def test_paired_difference_cancels_shared_block_variation():
  rng = np.random.default_rng(1)
  tokens = np.full(300, 64)
  text_b = rng.normal(3.0, 0.5, 300) * tokens   # hard and easy blocks
  a, b = text_b + rng.normal(0, 1, 300), text_b + 0.1 * tokens
  d = likelihood.paired_difference(b, a, tokens)
  sa = likelihood.summarize(a, tokens, {})["nats_per_token_sem"]
  sb = likelihood.summarize(b, tokens, {})["nats_per_token_sem"]
  direct = (b - a) / tokens
  assert math.isclose(d["diff_nats_per_token"], direct.mean(), rel_tol=1e-9)
  assert math.isclose(d["diff_nats_per_token_sem"],
                      direct.std(ddof=1) / math.sqrt(300), rel_tol=1e-9)
  assert d["diff_nats_per_token_sem"] < math.hypot(sa, sb) / 5
  with pytest.raises(ValueError, match="same blocks"):
    likelihood.paired_difference(b[:10], a, tokens)


def test_one_block_has_no_sem_and_tables_say_so():
  """One block: no standard error (NaN in memory, null in the JSON), and
  the report's tables print "n/a" instead of failing on either."""
  import json
  from diffusion_text import workdir
  from diffusion_text.eval import report
  r = likelihood.summarize(np.array([64.0]), np.array([32]), {})
  assert math.isnan(r["nats_per_token_sem"])
  stored = json.loads(workdir.dumps(r))
  assert stored["nats_per_token_sem"] is None
  for res in (r, stored):
    rows = [{"name": "m", "result": res, "tokens_seen": 10, "wall_s": 1.0}]
    md = report.markdown_table(rows, "toy")
    assert "2.000 ± n/a" in md
    assert "n/a" in report.latex_table(rows, "toy")
