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
