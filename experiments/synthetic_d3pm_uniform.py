"""D3PM uniform (Austin et al. 2021), T=1000, cosine schedule, hybrid loss on the synthetic Markov corpus of known entropy.

A seconds-long smoke run: the bound it prints must stay above the corpus
entropy (diffusion-text data --config synthetic_d3pm_uniform shows it).
Command:
  diffusion-text train --config synthetic_d3pm_uniform --workdir runs/synthetic_d3pm_uniform
"""

from experiments._base import synthetic


def config():
  return synthetic("d3pm_uniform")
