"""The paper-scale presets (text8_*, lm1b_*, owt_*_small) build and validate at tiny width."""

import pytest

from diffusion_text import config, processes, run

TINY = ["model.num_layers=1", "model.d_model=32", "model.num_heads=2",
        "model.cond_dim=16", "data.batch_size=4",
        "train.steps=2"]
# The published data protocol of each benchmark (docs/benchmarks.md).
PROTOCOL = {"text8": ("text8", "text8", 256), "lm1b": ("lm1b", "bert", 128),
            "owt": ("owt", "gpt2", 1024)}


@pytest.mark.parametrize("benchmark", sorted(PROTOCOL))
@pytest.mark.parametrize("process", processes.names())
def test_preset_instantiates_at_tiny_width(benchmark, process):
  name = f"{benchmark}_{process}" + ("_small" if benchmark == "owt" else "")
  assert name in config.preset_names()
  full = config.load_preset(name)
  assert full.process.name == process and full.name == name
  assert (full.data.source, full.data.tokenizer, full.data.seq_len) == PROTOCOL[benchmark]
  assert (full.model.num_layers, full.model.d_model, full.data.batch_size) == (12, 768, 512)
  config.validate(full)
  tiny = config.apply_overrides(full, TINY)
  config.validate(tiny)
  run.check_process(tiny)
  assert tiny.model.d_model == 32 and tiny.data.seq_len == full.data.seq_len


def test_benchmark_protocol_details():
  assert config.load_preset("owt_masked_small").data.valid_docs == 100_000
  assert config.load_preset("lm1b_masked").data.packing == "pad"
  assert config.load_preset("owt_masked_small").eval.split == "valid"


def test_owt_small_presets_run_in_bfloat16():
  cfg = config.load_preset("owt_sedd_absorb_small")
  assert cfg.model.dtype == "bfloat16" and cfg.model.num_heads == 12
  assert (cfg.train.lr, cfg.train.ema_decay, cfg.train.b2) == (3e-4, 0.9999, 0.999)


@pytest.mark.parametrize("process", processes.names())
def test_owt_small_preset_builds_its_model_at_tiny_width(process):
  from diffusion_text import binding, models
  tiny = config.apply_overrides(config.load_preset(f"owt_{process}_small"),
                                TINY + ["model.dtype=float32"])
  model = binding.build_model(run.build_process(tiny, 50257), tiny.model, 0)
  # GPT-2's vocabulary in and out: at least two 50k x 32 tables.
  assert models.count_params(model) > 2 * 50_000 * 32
