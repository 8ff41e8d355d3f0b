"""Data layer (DESIGN.md section 5): sources, tokenizers, the packing pipeline.

`sources` streams local corpora (`corpora`: document collections, text8, the
full LM1B; `remote`: tfds:/hf: catalog datasets; and a synthetic Markov
chain), `tokenizers` turns text into ids, `detokenizers` holds the SEDD
zero-shot detokenizers, `packing` cuts units into blocks in worker
processes, `shards` stores them as a TFDS array_record dataset (resumable,
published atomically), and `pipeline` ties them together and serves Grain
training batches and streamed eval batches. Submodules are imported on use so `import diffusion_text.data`
stays light.
"""
