"""Continuous-time Gaussian VLB (Kingma et al. 2021 VDM; Gulrajani & Hashimoto 2023 Plaid) at GPT-2-small size (bf16) on OpenWebText (GPT-2 tokens, EOS between documents, 1,024-token blocks, last 100k documents held out).

Command:
  diffusion-text train --config owt_gaussian_vlb_small --workdir runs/owt_gaussian_vlb_small \
    --set data.path=/path/to/openwebtext
  diffusion-text eval --workdir runs/owt_gaussian_vlb_small
  diffusion-text eval --suite zero-shot --workdir runs/owt_gaussian_vlb_small
Expected: perplexity bound on the held-out documents; published: AR 17.5, MDLM <= 23.2, SEDD <= 24.1 (see docs/benchmarks.md).
"""

from experiments._base import owt_small


def config():
  return owt_small("gaussian_vlb")
