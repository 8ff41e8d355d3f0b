"""D3PM absorbing [MASK] (Austin et al. 2021), T=1000, hybrid loss lambda=0.01 on the synthetic Markov corpus of known entropy.

A seconds-long smoke run: the bound it prints must stay above the corpus
entropy (diffusion-text data --config synthetic_d3pm_absorbing shows it).
Command:
  diffusion-text train --config synthetic_d3pm_absorbing --workdir runs/synthetic_d3pm_absorbing
"""

from experiments._base import synthetic


def config():
  return synthetic("d3pm_absorbing")
