"""The zero-shot suite: one checkpoint scored on the five sets of SEDD's Table 1.

Lou, Meng & Ermon 2024 (SEDD), Table 1: LAMBADA, WikiText-2, PTB,
WikiText-103 and One Billion Words, each detokenized row by row
(`data.detokenizers`), GPT-2 BPE, EOS after every row. Two block rules:

* `sedd` (default, the published table): SEDD's `data.py` groups rows
  through HF `datasets.map(batched=True, num_proc=8)`: the rows are split
  into 8 contiguous shards (the first n % 8 shards one row longer), each
  shard into batches of 1,000 rows, each batch concatenated on its own and
  cut into blocks, its remainder shorter than a block dropped.
* `whole`: the whole set concatenated (the data pipeline's `concat`
  packing); the final partial block is kept, padded and masked, so every
  token is scored.

Block length is the model's (`data.seq_len`; 1,024 for the paper models).
Each block's bound is the mean of K Monte-Carlo samples at stratified times
(the K samples are one batch of K copies to the process, whose times are
stratified over the batch), with the key `fold_in(key(seed), b)` for the
block's index b in the set: a block's figure depends on neither the batch
size nor the device count. Corpus figures are `likelihood.summarize`'s
ratio estimator and SEM. Tables are in `eval.zero_shot_table`.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import time
from typing import Callable, Iterator, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from diffusion_text import config as config_lib, run as run_lib, sharding
from diffusion_text import workdir as workdir_lib
from diffusion_text.data import detokenizers, packing, pipeline, sources
from diffusion_text.eval import likelihood, zero_shot_table
from diffusion_text.models import as_denoiser

SETS = ("lambada", "wikitext2", "ptb", "wikitext103", "lm1b")
SPLIT = "test"                 # every set is scored on its test split
PROTOCOL_VERSION = 1
SEDD_NUM_PROC = 8              # SEDD data.py: map(..., num_proc=8)
SEDD_MAP_BATCH = 1000          # HF datasets.map's default batch_size
BLOCK_RULES = {
    "sedd": "rows in 8 contiguous shards (first n%8 one row longer), "
            "batches of 1000 rows per shard, each batch concatenated and "
            "cut, remainder < block dropped",
    "whole": "whole set concatenated and cut, final partial block kept and "
             "masked",
}


# ------------------------------------------------------------ block rules
def sedd_groups(n_rows: int, num_proc: int = SEDD_NUM_PROC,
                batch: int = SEDD_MAP_BATCH) -> list[tuple[int, int]]:
  """[start, stop) row ranges concatenated together by SEDD's map: HF's
  contiguous `shard(num_proc, i)`, then `batch`-row map batches."""
  div, mod = divmod(n_rows, num_proc)
  groups = []
  for i in range(num_proc):
    start = div * i + min(i, mod)
    stop = start + div + (i < mod)
    groups += [(s, min(s + batch, stop)) for s in range(start, stop, batch)]
  return groups


def sedd_blocks(units: Sequence[np.ndarray], seq_len: int
                ) -> tuple[np.ndarray, np.ndarray]:
  """Rows (each with its EOS) -> (tokens [N, L], lengths [N]) by `sedd`."""
  parts = [np.zeros((0, seq_len), np.int32)]
  for start, stop in sedd_groups(len(units)):
    flat = np.concatenate([np.zeros(0, np.int32), *units[start:stop]])
    n = len(flat) // seq_len
    parts.append(flat[:n * seq_len].reshape(n, seq_len).astype(np.int32))
  tokens_NxL = np.concatenate(parts)
  return tokens_NxL, np.full(len(tokens_NxL), seq_len, np.int32)


def counts(units: Sequence[np.ndarray], seq_len: int) -> dict:
  """Tokens (EOS included) and blocks of a set under both rules."""
  total = int(sum(len(u) for u in units))
  kept = sum((sum(len(u) for u in units[a:b]) // seq_len)
             for a, b in sedd_groups(len(units)))
  return {"rows": len(units),
          "sedd": {"tokens": int(kept * seq_len), "blocks": int(kept)},
          "whole": {"tokens": total, "blocks": -(-total // seq_len)}}


# ------------------------------------------------------------------ data
def _sha256(path: pathlib.Path) -> str:
  with open(path, "rb") as f:
    return hashlib.file_digest(f, "sha256").hexdigest()


def set_units(name: str, tokenizer, data_dir=None
              ) -> tuple[list[np.ndarray], dict]:
  """The test rows of set `name` as GPT-2 ids + EOS, and their provenance."""
  if name not in SETS:
    raise config_lib.ConfigError(f"unknown zero-shot set {name!r}; choose "
                                 f"from {','.join(SETS)}")
  source = sources.get_source(name, data_dir)
  detok = detokenizers.detokenizer_for(name, tokenizer.name)
  units = packing.encode_docs(tokenizer, detok, list(source.documents(SPLIT)))
  files = {p.name: _sha256(p) for p in source.files(SPLIT)}
  info = {"split": SPLIT, "detokenizer": detok.__name__ if detok else None,
          "files_sha256": files}
  if name == "lm1b":   # only some held-out shards may be present
    info["shards_scored"] = sorted(files)
    info["note"] = (f"{len(files)} of the 50 held-out shards "
                    "(news.en.heldout-*-of-00050) scored")
  return units, info


def _whole_batches(run, name: str, batch_size: int, max_blocks: int):
  """`whole` blocks through the pipeline (cached array_record dataset)."""
  # The set's own files: not the training corpus's data.path.
  cfg = config_lib.apply_overrides(run.cfg, [f"data.source={name}",
                                             "data.path=none",
                                             "data.packing=concat"])
  prepared = pipeline.prepare(cfg, tokenizer=run.prepared.tokenizer)
  n = prepared.num_blocks(SPLIT)
  return pipeline.eval_batches(prepared, SPLIT, batch_size, max_blocks), n


def _array_batches(tokens_NxL, length_N, batch_size: int, max_blocks: int
                   ) -> Iterator[dict]:
  n = min(len(tokens_NxL), max_blocks) if max_blocks else len(tokens_NxL)
  seq_len = tokens_NxL.shape[1]
  for start in range(0, n, batch_size):
    stop = min(start + batch_size, n)
    tokens_BxL = np.zeros((batch_size, seq_len), np.int32)
    mask_BxL = np.zeros((batch_size, seq_len), np.int32)
    tokens_BxL[:stop - start] = tokens_NxL[start:stop]
    mask_BxL[:stop - start] = np.arange(seq_len) < length_N[start:stop, None]
    yield {"tokens": tokens_BxL, "mask": mask_BxL}


# --------------------------------------------------------------- scoring
def make_block_bound(process, graphdef, mc_samples: int):
  """(params, tokens [B, L], mask [B, L], index [B], key) -> (nats [B],
  terms {name: [B]}): each block's bound averaged over K stratified times,
  drawn with fold_in(key, index)."""
  def fn(params, tokens_BxL, mask_BxL, index_B, key):
    denoiser = as_denoiser(nnx.merge(graphdef, params))

    def one(tokens_L, mask_L, index):
      rep = lambda a: jnp.broadcast_to(a, (mc_samples,) + a.shape)
      bound = process.nll_bound(jax.random.fold_in(key, index), denoiser,
                                rep(tokens_L), rep(mask_L))
      return bound.nats.mean(), {k: v.mean() for k, v in bound.terms.items()}
    return jax.vmap(one)(tokens_BxL, mask_BxL, index_B)
  return fn


def score_blocks(process, graphdef, params, batches, mc_samples: int,
                 seed: int, mesh=None) -> dict:
  """`likelihood.summarize` of every block in `batches` (fixed-shape dicts
  {'tokens', 'mask'}; rows with an empty mask are padding)."""
  mesh = mesh if mesh is not None else sharding.make_mesh()
  data = sharding.batch_sharding(mesh)
  fn = jax.jit(make_block_bound(process, graphdef, mc_samples),
               in_shardings=(sharding.state_shardings(params, mesh), data,
                             data, data, sharding.replicated(mesh)),
               out_shardings=sharding.replicated(mesh))
  params = jax.device_put(params, sharding.state_shardings(params, mesh))
  key, offset = jax.random.key(seed), 0
  nats, tokens, terms = [], [], {}
  for batch in batches:
    rows = int((np.asarray(batch["mask"]).sum(-1) > 0).sum())
    index = np.arange(offset, offset + len(batch["mask"]), dtype=np.int32)
    offset += rows
    padded, _ = sharding.pad_batch({**batch, "index": index},
                                   sharding.batch_devices(mesh))
    b_nats, b_terms = fn(params, padded["tokens"], padded["mask"],
                         padded["index"], key)
    nats.append(np.asarray(b_nats)[:rows])
    tokens.append(np.asarray(batch["mask"])[:rows].sum(-1))
    for k, v in b_terms.items():
      terms.setdefault(k, []).append(np.asarray(v)[:rows])
  return likelihood.summarize(np.concatenate(nats), np.concatenate(tokens),
                              {k: np.concatenate(v) for k, v in terms.items()})


def _set_entry(result: dict, k: int, n_blocks: int) -> dict:
  return {"nll_bound": result["nats_per_token"],
          "nll_sem": result["nats_per_token_sem"],
          "perplexity_bound": result["perplexity"],
          "perplexity_sem": result["perplexity_sem"],
          "bits_per_token_bound": result["bits_per_token"],
          "tokens": result["num_tokens"], "blocks": result["num_blocks"],
          "blocks_in_set": n_blocks, "K": k, "bound": "upper"}


def _check_run(run) -> None:
  tok = run.prepared.tokenizer
  if tok.name != detokenizers.PROTOCOL_TOKENIZER:
    raise config_lib.ConfigError(
        f"the zero-shot suite is scored in GPT-2 BPE but this workdir's "
        f"tokenizer is {tok.name!r}; train or import a model with "
        "data.tokenizer=gpt2")


def evaluate_suite(workdir, overrides=(), sets: Optional[Sequence[str]] = None,
                   protocol: str = "sedd",
                   log: Callable[[str], None] = print) -> dict:
  """Score a workdir's checkpoint on `sets`; write zero_shot.json + tables."""
  if protocol not in BLOCK_RULES:
    raise config_lib.ConfigError(f"unknown protocol {protocol!r}; choose "
                                 f"{' or '.join(BLOCK_RULES)}")
  sets = list(sets or SETS)
  for name in sets:
    if name not in SETS:
      raise config_lib.ConfigError(f"unknown zero-shot set {name!r}; choose "
                                   f"from {','.join(SETS)}")
  workdir = pathlib.Path(workdir)
  run, params, step = run_lib.open_workdir(workdir, overrides, log)
  _check_run(run)
  cfg, ev, seq_len = run.cfg, run.cfg.eval, run.cfg.data.seq_len
  mesh = sharding.mesh_from_config(cfg.train)
  out_sets, data = {}, {}
  for name in sets:
    t0 = time.time()
    units, info = set_units(name, run.prepared.tokenizer, cfg.data.data_dir)
    info["counts"] = counts(units, seq_len)
    if protocol == "sedd":
      tokens_NxL, length_N = sedd_blocks(units, seq_len)
      batches = _array_batches(tokens_NxL, length_N, ev.batch_size,
                               ev.max_blocks)
      n_blocks = len(tokens_NxL)
    else:
      batches, n_blocks = _whole_batches(run, name, ev.batch_size,
                                         ev.max_blocks)
    result = score_blocks(run.process, run.graphdef, params, batches,
                          ev.mc_samples, ev.seed, mesh)
    out_sets[name] = _set_entry(result, ev.mc_samples, n_blocks)
    data[name] = info
    r = out_sets[name]
    log(f"[zero-shot] {name}: perplexity <= {r['perplexity_bound']:.2f} ± "
        f"{r['perplexity_sem']:.2f} (NLL <= {r['nll_bound']:.4f} nats/token; "
        f"{r['tokens']:,} tokens, {r['blocks']}/{n_blocks} blocks, "
        f"K={r['K']}, {time.time() - t0:.0f}s)")
  out = {"model": cfg.name, "process": cfg.process.name, "step": step,
         "ema": ev.use_ema, "sets": out_sets,
         "manifest": _manifest(run, workdir, protocol, data)}
  workdir_lib.atomic_write_json(workdir / "zero_shot.json", out)
  md, tex = zero_shot_table.tables([out])
  (workdir / "zero_shot.md").write_text(md)
  (workdir / "zero_shot.tex").write_text(tex)
  log(md)
  log(f"[zero-shot] written {workdir / 'zero_shot.json'} (+ .md, .tex)")
  return out


def _manifest(run, workdir: pathlib.Path, protocol: str, data: dict) -> dict:
  tok = run.prepared.tokenizer
  record = workdir / "import.json"
  imported = json.loads(record.read_text()) if record.exists() else None
  return {
      "protocol": {"name": protocol, "version": PROTOCOL_VERSION,
                   "family": detokenizers.PROTOCOL_NAME,
                   "block_rule": BLOCK_RULES[protocol],
                   "block_length": run.cfg.data.seq_len,
                   "eos_per_row": True, "split": SPLIT,
                   "mc_times": "K stratified times per block, key "
                               "fold_in(key(seed), block index)",
                   "seed": run.cfg.eval.seed},
      "tokenizer": {"name": tok.name, "fingerprint": tok.fingerprint()},
      "sets": data,
      "commit": likelihood.git_commit(),
      "checkpoint_fingerprint": (imported or {}).get(
          "checkpoint_fingerprint", run.fingerprint),
      "run_fingerprint": run.fingerprint,
      "imported_from": (imported or {}).get("source"),
  }


__all__ = ["BLOCK_RULES", "PROTOCOL_VERSION", "SETS", "counts",
           "evaluate_suite", "make_block_bound", "score_blocks",
           "sedd_blocks", "sedd_groups", "set_units"]
