"""The process registry: option checking (`check_options`), sampling options,
and fast checks every registered process shares, run also on the example
process of docs/adding_a_process.md registered from a temporary module."""

import dataclasses
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_text import processes, sampling
from diffusion_text.processes import SamplingOptions
from tests.helpers import constant_logits

V, B, L = 6, 4, 8
DOC = pathlib.Path(__file__).resolve().parent.parent / "docs" / "adding_a_process.md"
# Small settings so each process compiles quickly.
SMALL = {"gaussian": {"num_steps": 20, "latent_dim": 8},
         "gaussian_vlb": {"latent_dim": 8},
         "d3pm_uniform": {"num_steps": 20},
         "d3pm_absorbing": {"num_steps": 20}}


# ---- check_options -----------------------------------------------------------

def test_check_options_types_values_and_names():
  with pytest.raises(ValueError, match="antithetic='maybe'.*'masked'.*true or false"):
    processes.check_options("masked", {"antithetic": "maybe"})
  with pytest.raises(ValueError, match="num_steps=1.5.*'masked'.*integer"):
    processes.check_options("masked", {"num_steps": 1.5})
  with pytest.raises(ValueError, match="num_steps=True.*integer"):
    processes.check_options("masked", {"num_steps": True})
  with pytest.raises(ValueError, match="schedule=3.*string"):
    processes.check_options("sedd_absorb", {"schedule": 3})
  with pytest.raises(ValueError, match=r"unknown option\(s\) \['noise'\].*"
                     r"sedd_absorb.*valid options: .*schedule"):
    processes.check_options("sedd_absorb", {"noise": "geometric"})
  with pytest.raises(ValueError, match="'gaussian'.*schedule 'linear'.*"
                     "cosine_vp, linear_beta"):
    processes.check_options("gaussian", {"schedule": "linear"})
  got = processes.check_options(
      "masked", {"t_min": 0, "num_steps": 4.0, "antithetic": "False"})
  assert got == {"t_min": 0.0, "num_steps": 4, "antithetic": False}
  assert type(got["t_min"]) is float and type(got["num_steps"]) is int
  # make_process goes through it.
  assert processes.make_process("masked", vocab_size=V, num_steps=4.0).num_steps == 4
  with pytest.raises(ValueError, match="integer"):
    processes.make_process("masked", vocab_size=V, num_steps=4.5)


# ---- SamplingOptions -----------------------------------------------------------

def test_sampling_options_are_not_process_options():
  for name in processes.names():
    assert not {"sampler", "temperature", "top_p", "score_temperature"} & set(
        processes.option_names(name)), name
  with pytest.raises(ValueError, match="temperature"):
    SamplingOptions(temperature=-1.0)
  with pytest.raises(ValueError, match="top_p"):
    SamplingOptions(top_p=0.0)


@pytest.mark.parametrize("name", processes.names())
def test_unknown_sampler_names_raise_listing_the_valid_ones(name):
  process = processes.make_process(name, vocab_size=V)
  names = process.sampler_names()
  assert process.sampler(SamplingOptions()) == names[0]
  for sampler in names:
    assert process.sampler(SamplingOptions(sampler=sampler)) == sampler
  with pytest.raises(ValueError, match="choose one of: default, " + ", ".join(names)):
    process.sampler(SamplingOptions(sampler="nope"))
  with pytest.raises(ValueError, match="nope"):  # before anything compiles
    sampling.make_sampler(process, 2, L, options=SamplingOptions(sampler="nope"))
  for knob in ("temperature", "top_p"):
    if knob not in process.SAMPLING_KNOBS:
      with pytest.raises(ValueError, match=f"do not support {knob}"):
        process.sampler(SamplingOptions(**{knob: 0.5}))


# ---- fast shared checks ----------------------------------------------------------

def _denoiser(process):
  """Constant outputs of the shape the process asks for, plus an embedding
  table for the Gaussian families."""
  spec = process.model_spec
  table_VxD = jax.random.normal(jax.random.key(0), (V, spec.latent_dim or 1))
  den = constant_logits(jnp.linspace(-1.0, 1.0, spec.output_dim),
                        embed=lambda ids: table_VxD[ids])
  return dataclasses.replace(den, round_logits=lambda x: x @ table_VxD.T)


def fast_checks(process):
  """Bound and loss finite with terms adding up, padding free; every sampler
  deterministic for a key, in range, keeping prompt positions."""
  den = _denoiser(process)
  tokens = jax.random.randint(jax.random.key(1), (B, L), 0, V)
  mask = jnp.ones((B, L), jnp.int32).at[-1].set(0)  # one all-padding row
  bound = jax.jit(lambda k: process.nll_bound(k, den, tokens, mask))(
      jax.random.key(2))
  nats = np.asarray(bound.nats)
  assert nats.shape == (B,) and np.isfinite(nats).all()
  np.testing.assert_allclose(sum(bound.terms.values()), nats, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(nats[-1], 0.0, atol=1e-6)
  out = jax.jit(lambda k: process.loss(k, den, tokens, mask))(jax.random.key(3))
  assert out.loss.shape == () and np.isfinite(float(out.loss))
  assert "nll_bound" in out.metrics

  cond = jnp.zeros((L,), jnp.int32).at[:2].set(jnp.array([1, 2]))
  keep = jnp.arange(L) < 2
  for sampler in process.sampler_names():
    fn = sampling.make_sampler(process, 2, L, steps=4,
                               options=SamplingOptions(sampler=sampler))
    a = np.asarray(fn(jax.random.key(4), den, cond, keep))
    np.testing.assert_array_equal(a, fn(jax.random.key(4), den, cond, keep))
    assert a.dtype == np.int32 and a.min() >= 0 and a.max() < V, sampler
    np.testing.assert_array_equal(a[:, :2], [[1, 2]] * 2)


@pytest.mark.parametrize("name", processes.names())
def test_fast_checks_on_every_process(name):
  fast_checks(processes.make_process(name, vocab_size=V, **SMALL.get(name, {})))


def test_the_documented_example_process_passes(tmp_path, monkeypatch):
  code = re.search(r"```python\n(\"\"\"One-step.*?)```", DOC.read_text(),
                   re.S).group(1)
  (tmp_path / "one_step_example.py").write_text(code)
  monkeypatch.syspath_prepend(str(tmp_path))
  monkeypatch.setattr(processes, "_REGISTRY", dict(processes._REGISTRY))
  processes.register("one_step", "one_step_example:OneStep")
  assert "one_step" in processes.names()
  process = processes.make_process("one_step", vocab_size=V)
  assert processes.check_options("one_step", {"num_steps": 1.0}) == {"num_steps": 1}
  fast_checks(process)
  # Its bound is the exact NLL of independent tokens: with uniform logits,
  # L log V per full row.
  uniform = constant_logits(jnp.zeros(V))
  tokens = jnp.zeros((2, L), jnp.int32)
  nats = process.nll_bound(jax.random.key(0), uniform, tokens,
                           jnp.ones_like(tokens)).nats
  np.testing.assert_allclose(nats, L * np.log(V), rtol=1e-6)


def test_imports_run_one_way():
  """Processes never import Flax; models never import processes (both
  import the contract module)."""
  code = ("import sys, diffusion_text.processes as P\n"
          "[P.make_process(n, vocab_size=4) for n in P.names()]\n"
          "assert 'flax' not in sys.modules, 'processes imported flax'\n")
  subprocess.run([sys.executable, "-c", code], check=True,
                 cwd=pathlib.Path(__file__).resolve().parent.parent)
  code = ("import sys, diffusion_text.models\n"
          "bad = [m for m in sys.modules if m.startswith('diffusion_text.processes')]\n"
          "assert not bad, bad\n")
  subprocess.run([sys.executable, "-c", code], check=True,
                 cwd=pathlib.Path(__file__).resolve().parent.parent)
