"""Shared building blocks of the presets (not a preset itself)."""

import dataclasses

from diffusion_text.config import (Config, DataConfig, EvalConfig, ModelConfig,
                                   ProcessConfig, SampleConfig, TrainConfig)


def ptb_word(process: str, steps: int = 250, **options) -> Config:
  """PTB with its own 10k word vocabulary, a small shared backbone.

  Every PTB preset uses this backbone and token budget, so rows of a
  comparison differ only in the process.
  """
  return Config(
      name=f"ptb_{process}",
      process=ProcessConfig(name=process, options=dict(options)),
      model=ModelConfig(num_layers=2, d_model=128, num_heads=4, mlp_ratio=4,
                        cond_dim=64),
      data=DataConfig(source="ptb", tokenizer="word", seq_len=64,
                      batch_size=32),
      train=TrainConfig(steps=steps, lr=2e-3, warmup_steps=50, ema_decay=0.99,
                        log_every=25, checkpoint_every=125),
      eval=EvalConfig(split="test", mc_samples=1, batch_size=64),
      sample=SampleConfig(num=2, length=32),
  )


def synthetic(process: str, steps: int = 100, **options) -> Config:
  """The known-entropy Markov corpus with a tiny backbone (tests, smoke runs)."""
  return Config(
      name=f"synthetic_{process}",
      process=ProcessConfig(name=process, options=dict(options)),
      model=ModelConfig(num_layers=1, d_model=32, num_heads=2, mlp_ratio=2,
                        cond_dim=16),
      data=DataConfig(source="synthetic", tokenizer="identity", seq_len=16,
                      batch_size=16),
      train=TrainConfig(steps=steps, lr=3e-3, warmup_steps=10, ema_decay=0.0,
                        log_every=10, checkpoint_every=50),
      eval=EvalConfig(split="test", mc_samples=2, batch_size=32),
      sample=SampleConfig(num=2, length=16),
  )


# Paper-scale benchmarks: data settings as published, one backbone for all.
# The backbone is GPT-2 small sized (12 layers, width 768, 12 heads), as the
# DiT of SEDD (Lou et al. 2024) and MDLM (Sahoo et al. 2024) and MD4's text8
# transformer (Shi et al. 2024); AdamW at 3e-4 with warm-up, batch 512, EMA
# 0.9999, no weight decay, gradients clipped at 1. The LR is constant after
# warm-up for OWT/LM1B (MDLM) and cosine-decayed to 0 for text8 (MD4).
_BENCHMARKS = {
    # name: (DataConfig fields, eval split, train steps, warm-up, final LR ratio)
    "text8": (dict(source="text8", tokenizer="text8", seq_len=256),
              "test", 1_000_000, 2_000, 0.0),
    "lm1b": (dict(source="lm1b", tokenizer="bert", seq_len=128, packing="pad"),
             "test", 500_000, 2_500, 1.0),      # 500k x 512 x 128 = 33B tokens
    "owt": (dict(source="owt", tokenizer="gpt2", seq_len=1024,
                 valid_docs=100_000),
            "valid", 1_000_000, 2_500, 1.0),
}


def paper_scale(benchmark: str, process: str, **options) -> Config:
  """The published setting of `benchmark` (text8, lm1b, owt) for `process`.

  data.path must name the corpus (text8 file, LM1B release folder,
  OpenWebText documents): `--set data.path=...`.
  """
  data, split, steps, warmup, final_lr = _BENCHMARKS[benchmark]
  return Config(
      name=f"{benchmark}_{process}",
      process=ProcessConfig(name=process, options=dict(options)),
      model=ModelConfig(num_layers=12, d_model=768, num_heads=12, mlp_ratio=4,
                        cond_dim=128),
      data=DataConfig(batch_size=512, **data),
      train=TrainConfig(steps=steps, lr=3e-4, warmup_steps=warmup,
                        min_lr_ratio=final_lr, weight_decay=0.0, b2=0.999,
                        grad_clip=1.0, ema_decay=0.9999, log_every=100,
                        checkpoint_every=10_000, keep_checkpoints=2),
      eval=EvalConfig(split=split, mc_samples=1, batch_size=32),
      sample=SampleConfig(num=4, length=data["seq_len"]),
  )


def owt_small(process: str, **options) -> Config:
  """`owt_<process>_small`: the OpenWebText setting at GPT-2-small size
  (12 layers, width 768, 12 heads, L = 1,024) in bfloat16, as SEDD and MDLM
  train on accelerators. The corpus is data.source/data.path (OpenWebText
  files, or any local corpus: data.source=text data.path=FILE)."""
  cfg = paper_scale("owt", process, **options)
  return dataclasses.replace(
      cfg, name=f"owt_{process}_small",
      model=dataclasses.replace(cfg.model, dtype="bfloat16"))
