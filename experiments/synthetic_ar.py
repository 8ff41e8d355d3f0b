"""Autoregressive baseline (causal backbone, exact NLL) on the synthetic Markov corpus of known entropy.

A seconds-long smoke run: the bound it prints must stay above the corpus
entropy (diffusion-text data --config synthetic_ar shows it).
Command:
  diffusion-text train --config synthetic_ar --workdir runs/synthetic_ar
"""

from experiments._base import synthetic


def config():
  return synthetic("ar")
