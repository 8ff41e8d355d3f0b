"""Autoregressive baseline on the same backbone (causal mask) on text8 (27 characters, 90M/5M/5M split, 256-character chunks).

Command:
  diffusion-text train --config text8_ar --workdir runs/text8_ar \
    --set data.path=/path/to/text8
  diffusion-text eval --workdir runs/text8_ar
Expected: bits per character = nats/token / ln 2 on the test split; published: MD4 <= 1.37, SEDD <= 1.39, MDLM <= 1.40, D3PM-absorbing <= 1.45, AR 1.23 (see docs/benchmarks.md).
"""

from experiments._base import paper_scale


def config():
  return paper_scale("text8", "ar")
