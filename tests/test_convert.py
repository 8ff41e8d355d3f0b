"""Converters of published checkpoints against the golden fixtures.

The fixtures (../shared/fixtures/checkpoints, or $DIFFUSION_TEXT_FIXTURES)
are tiny random models run by the original PyTorch code; each converted
model must reproduce their reference outputs to 1e-4 in float32, and each
backbone adapter must give its process what the published model means.
"""

from __future__ import annotations

import math
import os
import pickle
import zipfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from diffusion_text import binding
from diffusion_text.models import backbones, convert, dit_sedd, weights
from diffusion_text.processes import Denoiser, make_process

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(os.environ.get("DIFFUSION_TEXT_FIXTURES",
                               REPO.parent / "shared" / "fixtures"))
CKPT = FIXTURES / "checkpoints"
TOL = 1e-4

needs_fixtures = pytest.mark.skipif(
    not CKPT.is_dir(), reason=f"no checkpoint fixtures at {CKPT}")


def _load(name: str):
  folder = CKPT / name
  return convert.import_checkpoint(folder), dict(np.load(folder / "io.npz"))


# One compile per model beats eager op-by-op dispatch by far on CPU.
_call = nnx.jit(lambda model, *args: model(*args))


def _bound_predict(imp, process):
  """jitted (model, x, t) -> the adapter's predict."""
  return nnx.jit(lambda model, x, t: binding.bind_backbone(
      imp.backbone, model, process).predict(x, t))


def _maxabs(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


# ---------------------------------------------------------------- readers
@needs_fixtures
def test_torch_bin_equals_safetensors():
  folder = CKPT / "sedd_absorb_tiny"
  st = weights.read_safetensors(folder / "model.safetensors")
  pt = weights.read_torch_bin(folder / "pytorch_model.bin")
  assert sorted(st) == sorted(pt) and len(st) == 31
  for key in st:
    assert st[key].dtype == pt[key].dtype and np.array_equal(st[key], pt[key])


class _Evil:
  def __init__(self, path: str):
    self.path = path

  def __reduce__(self):
    return (os.system, (f"touch {self.path}",))


def test_forbidden_global_is_refused(tmp_path):
  marker = tmp_path / "executed"
  evil = tmp_path / "evil.bin"
  with zipfile.ZipFile(evil, "w") as z:
    z.writestr("archive/data.pkl",
               pickle.dumps({"w": _Evil(str(marker))}, protocol=2))
  with pytest.raises(weights.UnsafePickleError, match="system"):
    weights.read_torch_bin(evil)
  assert not marker.exists()


def test_safetensors_roundtrip(tmp_path):
  """A hand-written file in the documented layout reads back exactly."""
  a = np.arange(6, dtype=np.float32).reshape(2, 3)
  b = np.array([7, -1], np.int64)
  header = (b'{"a":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]},'
            b'"b":{"dtype":"I64","shape":[2],"data_offsets":[24,40]},'
            b'"__metadata__":{"format":"pt"}}')
  path = tmp_path / "x.safetensors"
  path.write_bytes(len(header).to_bytes(8, "little") + header
                   + a.tobytes() + b.tobytes())
  out = weights.read_state_dict(path)
  assert sorted(out) == ["a", "b"]
  np.testing.assert_array_equal(out["a"], a)
  np.testing.assert_array_equal(out["b"], b)


# ------------------------------------------------------------- converters
@needs_fixtures
@pytest.mark.parametrize("name", ["sedd_absorb_tiny", "sedd_uniform_tiny"])
def test_sedd_matches_reference(name):
  imp, io_ = _load(name)
  ids = jnp.asarray(io_["input_ids"], jnp.int32)
  raw = _call(imp.model, ids, jnp.asarray(io_["sigma"]))
  assert _maxabs(raw, io_["dbg_output_layer"]) < TOL
  score = dit_sedd.sedd_log_score(
      raw, ids, io_["sigma"],
      scale_by_sigma=imp.process_options.get("scale_by_sigma", False))
  assert _maxabs(score, io_["output"]) < TOL
  assert imp.process == name.split("_tiny")[0]


@needs_fixtures
@pytest.mark.parametrize("variant", ["false", "true"])
def test_mdlm_matches_reference(variant):
  imp, io_ = _load(f"mdlm_tiny/time_conditioning_{variant}")
  ids = jnp.asarray(io_["input_ids"], jnp.int32)
  logits = _call(imp.model, ids, jnp.asarray(io_["sigma"]))
  assert _maxabs(logits, io_["logits"]) < TOL
  subs = np.asarray(dit_sedd.mdlm_subs_log_probs(logits, ids,
                                                 int(io_["mask_id"])))
  ref = io_["log_probs_subs"]
  regular = ref > -1e5
  assert _maxabs(subs[regular], ref[regular]) < TOL
  assert np.all(subs[~regular] < -1e5)
  assert imp.process_options["time_conditioning"] == (variant == "true")


@needs_fixtures
@pytest.mark.parametrize("weights_file", [
    "model.safetensors", "model.save_pretrained.safetensors"])
def test_gpt2_matches_reference(weights_file):
  folder = CKPT / "gpt2_tiny"
  config, _ = weights.read_checkpoint_dir(folder)
  imp = convert.convert(config, weights.read_state_dict(folder / weights_file))
  io_ = np.load(folder / "io.npz")
  logits = _call(imp.model, jnp.asarray(io_["input_ids"], jnp.int32))
  assert _maxabs(logits, io_["logits"]) < TOL
  assert imp.kind == "gpt2" and imp.process == "ar"


@needs_fixtures
def test_converter_rejects_missing_tensor():
  config, state = weights.read_checkpoint_dir(CKPT / "sedd_uniform_tiny")
  del state["blocks.1.mlp.0.bias"]
  with pytest.raises(ValueError, match="blocks.1.mlp.0.bias"):
    convert.convert(config, state)


# --------------------------------------------- adapters and the processes
@needs_fixtures
def test_sedd_absorb_process_reads_published_score():
  """SEDDAbsorb.log_score on the adapter equals the published log-score
  plus log(e^sigma - 1) off the input token (the process's finite form)."""
  imp, io_ = _load("sedd_absorb_tiny")
  process = make_process(imp.process, **imp.process_options)
  predict = _bound_predict(imp, process)
  denoiser = Denoiser(predict=lambda x, t: predict(imp.model, x, t))
  ids = jnp.asarray(io_["input_ids"], jnp.int32)
  t_B = jnp.asarray(io_["t_loglinear_equiv"])
  ours = np.asarray(process.log_score(denoiser, ids, t_B))
  sigma_B = io_["sigma"].astype(np.float64)
  published = io_["output"][..., :process.vocab_size] + np.log(
      np.expm1(sigma_B))[:, None, None]
  off_token = ~np.asarray(jax.nn.one_hot(ids, process.vocab_size, dtype=bool))
  assert np.abs(ours - published)[off_token].max() < TOL


@needs_fixtures
def test_masked_process_reads_mdlm_subs():
  """The masked process's p(x0 | x_t) at masked positions is MDLM's SUBS."""
  imp, io_ = _load("mdlm_tiny/time_conditioning_false")
  process = make_process(imp.process, **imp.process_options)
  predict = _bound_predict(imp, process)
  denoiser = Denoiser(predict=lambda x, t: predict(imp.model, x, t))
  ids = jnp.asarray(io_["input_ids"], jnp.int32)
  probs = np.asarray(process.x0_probs(denoiser, ids, 0.5))  # unnormalised
  log_p = np.log(probs / probs.sum(-1, keepdims=True))
  masked = np.asarray(ids == process.mask_id)
  ref = io_["log_probs_subs"][..., :process.vocab_size]
  assert _maxabs(log_p[masked], ref[masked]) < TOL


@needs_fixtures
def test_mdlm_adapter_feeds_total_noise():
  imp, io_ = _load("mdlm_tiny/time_conditioning_true")
  sigma = jnp.asarray(io_["sigma"])
  out = nnx.jit(lambda model, x, t: backbones.mdlm_denoiser(
      model, time_fn=lambda t: sigma * t).predict(x, t))(
          imp.model, jnp.asarray(io_["input_ids"], jnp.int32), jnp.ones(3))
  assert out.shape[-1] == 50
  assert _maxabs(out, io_["logits"][..., :50]) < TOL


@needs_fixtures
def test_gpt2_adapter_reads_bos_as_endoftext():
  imp, io_ = _load("gpt2_tiny")
  process = make_process("ar", **imp.process_options)
  tokens = jnp.asarray(io_["input_ids"], jnp.int32)
  nll = np.asarray(nnx.jit(lambda model, x: process.token_nll(
      binding.bind_backbone("gpt2", model, process), x))(imp.model, tokens))
  inputs = jnp.concatenate(
      [jnp.full((3, 1), imp.arch.bos_token), tokens[:, :-1]], axis=1)
  log_p = jax.nn.log_softmax(_call(imp.model, inputs), axis=-1)
  expect = -np.take_along_axis(np.asarray(log_p), np.asarray(tokens)[..., None],
                               -1)[..., 0]
  assert _maxabs(nll, expect) < 1e-5
  assert math.isfinite(float(nll.sum()))


@needs_fixtures
def test_backbone_vocab_mismatch_is_refused():
  imp, _ = _load("sedd_uniform_tiny")
  with pytest.raises(ValueError, match="input ids"):
    binding.build_backbone("sedd_dit", imp.arch,
                             make_process("sedd_absorb", vocab_size=50))


@needs_fixtures
@pytest.mark.parametrize("name", ["sedd_absorb_tiny", "sedd_uniform_tiny",
                                  "mdlm_tiny/time_conditioning_false",
                                  "gpt2_tiny"])
def test_imported_bound_is_finite_under_jit(name):
  """Each imported model scores a batch through its process, jitted."""
  imp, io_ = _load(name)
  process = make_process(imp.process, **imp.process_options)
  graphdef, params = nnx.split(imp.model)

  @jax.jit
  def bound(params, key, tokens):
    model = nnx.merge(graphdef, params)
    denoiser = binding.bind_backbone(imp.backbone, model, process)
    return process.nll_bound(key, denoiser, tokens, jnp.ones_like(tokens))

  tokens = jnp.asarray(io_["input_ids"], jnp.int32) % process.vocab_size
  nats_B = np.asarray(bound(params, jax.random.key(0), tokens).nats)
  assert nats_B.shape == (3,) and np.all(np.isfinite(nats_B))
  assert np.all(nats_B > 0)
