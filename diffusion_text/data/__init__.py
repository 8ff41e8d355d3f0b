"""Data layer (DESIGN.md section 5): sources, tokenizers, the packing pipeline.

`sources` reads local corpora (and a synthetic Markov chain), `tokenizers`
turns text into ids, `pipeline` packs ids into blocks cached as TFDS
array_record and serves Grain training batches and padded eval batches.
Submodules are imported on use so `import diffusion_text.data` stays light.
"""
