"""Published PyTorch checkpoints -> NNX modules, by kind (a registry).

`import_checkpoint(folder)` reads config.json and the weights
(`models.weights`, torch-free), detects the kind from the config and runs
its converter:

  kind   config.json                         module              process
  gpt2   transformers GPT2Config             gpt2.GPT2           ar
  sedd   SEDD's hydra dict (graph, model)    dit_sedd.ScoreDiT   sedd_absorb /
                                                                 sedd_uniform
  mdlm   MDLMConfig (model_type "mdlm")      dit_sedd.ScoreDiT   masked
                                             (time_conditioning from config)

Each converter maps every published tensor onto one parameter of the
module (torch Linear weights [out, in] are transposed; GPT-2's Conv1D
weights are already [in, out]), drops known constant buffers
(`rotary_emb.inv_freq`, GPT-2's `attn.bias` / `attn.masked_bias` masks) and
fails on any missing, extra or mis-shaped tensor. The result carries the
process name and options the published model was trained with.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any, Callable, Optional

import jax.numpy as jnp
import numpy as np
from flax import nnx

from diffusion_text.models.dit_sedd import DiTConfig, ScoreDiT
from diffusion_text.models.gpt2 import GPT2, GPT2Config
from diffusion_text.models.weights import StateDict, read_checkpoint_dir

ParamPath = tuple[Any, ...]


@dataclasses.dataclass(frozen=True)
class Imported:
  """A converted checkpoint.

  kind: converter name; backbone: `models.backbones` name; arch: the
  module's config (GPT2Config / DiTConfig); model: the NNX module with the
  published weights; process / process_options: what it was trained as
  (vocab_size = data tokens, [MASK] and BOS excluded); source_config: the
  published config.json.
  """

  kind: str
  backbone: str
  arch: Any
  model: nnx.Module
  process: str
  process_options: dict
  source_config: dict


@dataclasses.dataclass(frozen=True)
class Converter:
  """detect(config) -> bool; arch(config) -> module config; params(state,
  arch) -> {module path: array}; process(config, arch) -> (name, options)."""

  backbone: str
  module: Callable[..., nnx.Module]
  detect: Callable[[dict], bool]
  arch: Callable[[dict], Any]
  params: Callable[[StateDict, Any], dict[ParamPath, np.ndarray]]
  process: Callable[[dict, Any], tuple[str, dict]]


def assemble(module: Callable[..., nnx.Module], arch: Any,
             params: dict[ParamPath, np.ndarray]) -> nnx.Module:
  """Build `module(arch)` without initialising it and fill every parameter
  from `params`; missing, unused or mis-shaped entries raise."""
  graphdef, state = nnx.split(
      nnx.eval_shape(lambda: module(arch, rngs=nnx.Rngs(0))))
  flat = []
  for path, var in nnx.to_flat_state(state):
    if path not in params:
      raise ValueError(f"checkpoint has no value for {'.'.join(map(str, path))}")
    value = np.asarray(params.pop(path), np.float32)
    if value.shape != var.shape:
      raise ValueError(f"{'.'.join(map(str, path))}: checkpoint shape "
                       f"{value.shape}, model expects {var.shape}")
    flat.append((path, var.replace(jnp.asarray(value))))
  if params:
    raise ValueError(f"unused checkpoint values: {sorted(params)[:5]}")
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


class _Taker:
  """Pops tensors by name so leftovers can be reported."""

  def __init__(self, state: StateDict, prefix: str, ignore: str):
    self.state = {k[len(prefix):] if k.startswith(prefix) else k: v
                  for k, v in state.items() if not re.search(ignore, k)}

  def __call__(self, key: str, transpose: bool = False) -> np.ndarray:
    if key not in self.state:
      raise ValueError(f"checkpoint lacks tensor {key!r}")
    value = self.state.pop(key)
    return value.T if transpose else value

  def done(self) -> None:
    if self.state:
      raise ValueError(f"unexpected checkpoint tensors: {sorted(self.state)[:5]}")


def _linear_params(params, path, take, key, *, transpose, bias=True):
  params[path + ("kernel",)] = take(key + ".weight", transpose)
  if bias:
    params[path + ("bias",)] = take(key + ".bias")


# ------------------------------------------------------------------ GPT-2
def _gpt2_arch(config: dict) -> GPT2Config:
  if config.get("activation_function", "gelu_new") not in ("gelu_new",
                                                            "gelu_pytorch_tanh"):
    raise ValueError("only GPT-2 with activation_function 'gelu_new' is "
                     f"supported, not {config['activation_function']!r}")
  if config.get("n_inner") not in (None, 4 * config["n_embd"]):
    raise ValueError("only GPT-2 with n_inner = 4 n_embd is supported")
  return GPT2Config(vocab_size=config["vocab_size"],
                    max_length=config["n_positions"],
                    d_model=config["n_embd"], num_layers=config["n_layer"],
                    num_heads=config["n_head"],
                    eps=config.get("layer_norm_epsilon", 1e-5),
                    bos_id=_or(config.get("bos_token_id"), -1))


def _or(value, default):
  return default if value is None else value


def _gpt2_params(state: StateDict, arch: GPT2Config) -> dict:
  # Hub files carry no prefix, save_pretrained files 'transformer.'; the
  # causal-mask buffers are constants and the tied lm_head copies wte.
  take = _Taker(state, "transformer.",
                r"\.attn\.(masked_)?bias$|^lm_head\.weight$")
  params = {("wte", "embedding"): take("wte.weight"),
            ("wpe", "embedding"): take("wpe.weight")}
  for i in range(arch.num_layers):
    pre, path = f"h.{i}.", ("blocks", i)
    for ours, theirs in (("ln_1", "ln_1"), ("ln_2", "ln_2")):
      params[path + (ours, "scale")] = take(pre + theirs + ".weight")
      params[path + (ours, "bias")] = take(pre + theirs + ".bias")
    for ours, theirs in (("c_attn", "attn.c_attn"), ("attn_proj", "attn.c_proj"),
                         ("c_fc", "mlp.c_fc"), ("mlp_proj", "mlp.c_proj")):
      _linear_params(params, path + (ours,), take, pre + theirs,
                     transpose=False)  # Conv1D stores [in, out]
  params[("ln_f", "scale")] = take("ln_f.weight")
  params[("ln_f", "bias")] = take("ln_f.bias")
  take.done()
  return params


# -------------------------------------------------------- SEDD / MDLM DiT
def _dit_params(state: StateDict, arch: DiTConfig, prefix: str) -> dict:
  take = _Taker(state, prefix, r"rotary_emb\.inv_freq$")
  params = {("embed", "embedding"): take("vocab_embed.embedding")}
  _linear_params(params, ("sigma_in",), take, "sigma_map.mlp.0", transpose=True)
  _linear_params(params, ("sigma_out",), take, "sigma_map.mlp.2", transpose=True)
  for i in range(arch.num_layers):
    pre, path = f"blocks.{i}.", ("blocks", i)
    params[path + ("norm1", "scale")] = take(pre + "norm1.weight")
    params[path + ("norm2", "scale")] = take(pre + "norm2.weight")
    for ours, theirs, bias in (("qkv", "attn_qkv", False),
                               ("attn_out", "attn_out", False),
                               ("mlp_in", "mlp.0", True),
                               ("mlp_out", "mlp.2", True),
                               ("ada", "adaLN_modulation", True)):
      _linear_params(params, path + (ours,), take, pre + theirs,
                     transpose=True, bias=bias)
  params[("final_norm", "scale")] = take("output_layer.norm_final.weight")
  _linear_params(params, ("final_ada",), take,
                 "output_layer.adaLN_modulation", transpose=True)
  _linear_params(params, ("head",), take, "output_layer.linear",
                 transpose=True)
  take.done()
  return params


def _sedd_arch(config: dict) -> DiTConfig:
  graph = config["graph"]["type"]
  if graph not in ("absorb", "uniform"):
    raise ValueError(f"SEDD graph.type {graph!r}; expected absorb or uniform")
  m = config["model"]
  return DiTConfig(
      vocab_size=config["tokens"] + (graph == "absorb"),
      d_model=m["hidden_size"], num_layers=m["n_blocks"],
      num_heads=m["n_heads"], cond_dim=m["cond_dim"],
      max_length=m.get("length", 1024))


def _sedd_process(config: dict, arch: DiTConfig) -> tuple[str, dict]:
  """SEDD's noise as our process options; its DiT reads sigma_bar(t)."""
  del arch
  noise = config["noise"]
  options = {"vocab_size": config["tokens"], "schedule": noise["type"],
             "time_input": "total_noise"}
  if noise["type"] == "geometric":
    options.update(sigma_min=noise["sigma_min"], sigma_max=noise["sigma_max"])
  if config["graph"]["type"] == "absorb":
    options["scale_by_sigma"] = bool(config["model"]["scale_by_sigma"])
    return "sedd_absorb", options
  return "sedd_uniform", options


def _mdlm_arch(config: dict) -> DiTConfig:
  return DiTConfig(
      vocab_size=config["vocab_size"], d_model=config["hidden_dim"],
      num_layers=config["n_blocks"], num_heads=config["n_heads"],
      cond_dim=config["cond_dim"], max_length=config["model_length"],
      time_conditioning=bool(config.get("time_conditioning", False)))


def _mdlm_process(config: dict, arch: DiTConfig) -> tuple[str, dict]:
  # [MASK] is the last id (vocab_size - 1), our masked process's mask_id.
  return "masked", {"vocab_size": arch.vocab_size - 1,
                    "time_conditioning": arch.time_conditioning}


CONVERTERS: dict[str, Converter] = {
    "gpt2": Converter(
        backbone="gpt2", module=GPT2,
        detect=lambda c: c.get("model_type") == "gpt2",
        arch=_gpt2_arch, params=_gpt2_params,
        process=lambda c, a: ("ar", {"vocab_size": a.vocab_size})),
    "sedd": Converter(
        backbone="sedd_dit", module=ScoreDiT,
        detect=lambda c: "graph" in c and "tokens" in c and "model" in c,
        arch=_sedd_arch, params=lambda s, a: _dit_params(s, a, ""),
        process=_sedd_process),
    "mdlm": Converter(
        backbone="mdlm_dit", module=ScoreDiT,
        detect=lambda c: c.get("model_type") == "mdlm",
        arch=_mdlm_arch, params=lambda s, a: _dit_params(s, a, "backbone."),
        process=_mdlm_process),
}


def detect_kind(config: dict) -> str:
  """The converter name whose `detect` accepts `config`."""
  for name, converter in CONVERTERS.items():
    if converter.detect(config):
      return name
  raise ValueError("config.json matches no known checkpoint kind "
                   f"({', '.join(CONVERTERS)}); name one with kind=...")


def convert(config: dict, state: StateDict,
            kind: Optional[str] = None) -> Imported:
  """Published config + state dict -> `Imported` (kind detected if None)."""
  kind = kind or detect_kind(config)
  if kind not in CONVERTERS:
    raise ValueError(f"unknown checkpoint kind {kind!r}; choose one of: "
                     f"{', '.join(CONVERTERS)}")
  conv = CONVERTERS[kind]
  arch = conv.arch(config)
  model = assemble(conv.module, arch, conv.params(dict(state), arch))
  process, options = conv.process(config, arch)
  return Imported(kind=kind, backbone=conv.backbone, arch=arch, model=model,
                  process=process, process_options=options,
                  source_config=config)


def import_checkpoint(folder: str | Path,
                      kind: Optional[str] = None) -> Imported:
  """Read a published checkpoint folder (config.json + model.safetensors or
  pytorch_model.bin) and convert it."""
  config, state = read_checkpoint_dir(folder)
  return convert(config, state, kind)


__all__ = ["CONVERTERS", "Converter", "Imported", "assemble", "convert",
           "detect_kind", "import_checkpoint"]
