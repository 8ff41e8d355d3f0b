"""Shared building blocks of the presets (not a preset itself)."""

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
