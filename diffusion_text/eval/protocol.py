"""The SEDD zero-shot evaluation protocol, pinned into every result.

Lou, Meng & Ermon 2024, "Discrete Diffusion Modeling by Estimating the Ratios
of the Data Distribution" (SEDD), Table 1 / Appendix: every evaluation set is
detokenized row by row with a dataset-specific function
(`diffusion_text.data.detokenizers`), tokenized with GPT-2 BPE, an EOS is
appended to every row (empty rows included), the rows are concatenated and
cut into non-overlapping 1024-token blocks.

One documented difference: SEDD drops the final partial block; our pipeline
keeps it, padded and masked, so every token of the set is scored.
"""

from __future__ import annotations

from diffusion_text.data import detokenizers

PROTOCOL = {
    "name": detokenizers.PROTOCOL_NAME,
    "tokenizer": detokenizers.PROTOCOL_TOKENIZER,
    "eos_per_row": True,
    "block_length": 1024,        # configurable via data.seq_len
    "concatenate_rows": True,
    "final_partial_block": "kept, padded, masked",
    "detokenizers": {s: f.__name__ for s, f in detokenizers.DETOKENIZERS.items()},
    "reference": "Lou et al. 2024 (SEDD), data.py",
}
