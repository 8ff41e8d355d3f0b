"""D3PM absorbing (Austin et al. 2021) on OpenWebText (GPT-2 tokens, EOS between documents, 1,024-token blocks, last 100k documents held out).

Command:
  diffusion-text train --config owt_d3pm_absorbing --workdir runs/owt_d3pm_absorbing \
    --set data.path=/path/to/openwebtext
  diffusion-text eval --workdir runs/owt_d3pm_absorbing
Expected: perplexity bound on the held-out documents; published: AR 17.5, MDLM <= 23.2, SEDD <= 24.1 (see docs/benchmarks.md).
"""

from experiments._base import paper_scale


def config():
  return paper_scale("owt", "d3pm_absorbing")
