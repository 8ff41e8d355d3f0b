"""Model FLOPs: the one analytic count behind MFU and the benchmarks.

The trainer's progress line (MFU), benchmarks/run.py and
benchmarks/device.py all divide by this count, so their utilisation figures
compare like with like across processes and machines.
"""

from __future__ import annotations

from diffusion_text import config as config_lib


def model_flops(cfg: config_lib.Config, vocab: int) -> dict:
  """Analytic model FLOPs per token, the same for every process.

  Counted: the backbone's matmul weights (qkv, attention out, MLP up/down),
  2 FLOPs per multiply-add; full (non-causal) attention scores and values,
  4 L d per layer; and a d x V output head at every position. Training is
  3x the forward (forward, input gradient, weight gradient). Not counted:
  embedding lookups, the time/adaLN conditioning (once per sequence), norms,
  softmax, the loss and the optimizer. This is the dense reference model of
  DESIGN.md section 8: a process that evaluates its head at fewer positions,
  or whose backbone differs slightly (Gaussian stems), is still credited the
  same work per token, so the fraction of peak ranks tokens/s fairly.
  """
  m, length = cfg.model, cfg.data.seq_len
  d, hidden = m.d_model, m.mlp_ratio * m.d_model
  matmul_params = m.num_layers * (4 * d * d + 2 * d * hidden)
  attention = 4 * length * d * m.num_layers
  head = 2 * d * vocab
  forward = 2 * matmul_params + attention + head
  return {"forward_per_token": forward, "train_per_token": 3 * forward,
          "backbone_matmul_params": matmul_params}


def train_flops_per_step(cfg: config_lib.Config, vocab: int) -> float:
  """Model FLOPs of one optimizer step on the global batch."""
  tokens = cfg.data.batch_size * cfg.data.seq_len
  return float(model_flops(cfg, vocab)["train_per_token"] * tokens)
