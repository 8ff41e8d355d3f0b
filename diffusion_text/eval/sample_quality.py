"""Generative quality against sampling cost: `diffusion-text sample-eval`.

For each number of reverse steps, N samples are drawn from a workdir and
scored as in SEDD (Lou et al. 2024, sec. 5.2) and MDLM (Sahoo et al. 2024,
Table 5):
  - generative perplexity: exp of the NLL per token of the samples under an
    autoregressive judge (any `ar` workdir), scored by the one likelihood
    evaluator on blocks of the judge's length (padding masked);
  - mean unigram entropy per sample (nats), which drops under mode collapse
    (low-entropy, repetitive samples flatter the generative perplexity);
  - the fraction of repeated n-grams per sample;
  - wall time, tokens/s and the number of network calls (counted as they
    run, so a cached sampler's skipped calls are not counted).
When the judge's tokenizer differs from the model's, samples are decoded with
the model's tokenizer and encoded with the judge's; the text a tokenizer
writes for EOS splits units, which the judge encodes as its own EOS.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import threading
import time
from typing import Callable, Optional, Sequence

import jax
import numpy as np

from diffusion_text import config as config_lib, run as run_lib, sharding
from diffusion_text import workdir as workdir_lib
from diffusion_text.data import pipeline
from diffusion_text.eval import likelihood, report, samples

NGRAMS = (2, 3, 4)


# ---- per-sample statistics ---------------------------------------------------
def unigram_entropy(ids: Sequence[int]) -> float:
  """Entropy (nats) of one sample's empirical token distribution."""
  _, counts = np.unique(np.asarray(ids), return_counts=True)
  p = counts / counts.sum()
  return float(-(p * np.log(p)).sum())


def repeated_ngram_fraction(ids: Sequence[int], n: int) -> float:
  """Share of a sample's n-grams that repeat an earlier one (0 if none)."""
  ids = [int(i) for i in ids]
  grams = [tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)]
  return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def text_statistics(ids_NxL: np.ndarray) -> dict:
  ent = [unigram_entropy(r) for r in ids_NxL]
  out = {"entropy": float(np.mean(ent)),
         "entropy_sem": float(np.std(ent, ddof=1) / math.sqrt(len(ent)))
         if len(ent) > 1 else float("nan")}
  for n in NGRAMS:
    out[f"repeated_{n}grams"] = float(np.mean(
        [repeated_ngram_fraction(r, n) for r in ids_NxL]))
  return out


# ---- the judge ---------------------------------------------------------------
@dataclasses.dataclass
class Judge:
  """An `ar` workdir that scores token sequences (exact NLL)."""
  run: run_lib.Run
  params: object
  step: int
  workdir: str

  @classmethod
  def open(cls, workdir, log: Callable[[str], None] = print) -> "Judge":
    run, params, step = run_lib.open_workdir(workdir, (), log)
    if run.cfg.process.name != "ar":
      raise ValueError(f"the judge {workdir} is a {run.cfg.process.name!r} "
                       "run; pass an `ar` workdir as --judge (generative "
                       "perplexity needs an exact likelihood)")
    return cls(run, params, step, str(workdir))

  @property
  def tokenizer(self):
    return self.run.prepared.tokenizer

  @property
  def length(self) -> int:
    return self.run.cfg.data.seq_len

  def provenance(self) -> dict:
    return {"workdir": self.workdir, "fingerprint": self.run.fingerprint,
            "tokenizer": self.tokenizer.fingerprint(), "step": self.step,
            "seq_len": self.length}

  def to_judge_ids(self, ids: Sequence[Sequence[int]], tokenizer,
                   retokenize: Optional[bool] = None) -> list[list[int]]:
    """Token ids of the model's `tokenizer` -> the judge's token ids."""
    if retokenize is None:
      retokenize = tokenizer.fingerprint() != self.tokenizer.fingerprint()
    if not retokenize:
      out = [[int(i) for i in row] for row in ids]
      if any(not 0 <= i < self.run.prepared.vocab_size for r in out for i in r):
        raise ValueError("samples hold ids outside the judge's vocabulary "
                         "(e.g. an unfilled [MASK]): sample with more steps")
      return out
    return [retokenize_text(tokenizer.decode(row), tokenizer, self.tokenizer)
            for row in ids]

  def blocks(self, seqs: Sequence[Sequence[int]]) -> dict:
    """Each sequence cut into blocks of the judge's length, the last one
    padded and masked: {'tokens' [M, L], 'mask' [M, L]}."""
    rows = [s[i:i + self.length] for s in seqs
            for i in range(0, max(len(s), 1), self.length)]
    tokens = np.zeros((len(rows), self.length), np.int32)
    mask = np.zeros((len(rows), self.length), bool)
    for r, row in enumerate(rows):
      tokens[r, :len(row)], mask[r, :len(row)] = row, True
    return {"tokens": tokens, "mask": mask}

  def score(self, blocks: dict) -> dict:
    """The judge's NLL figures on `blocks`, by the one evaluator (exactly
    as `diffusion-text eval` scores the judge's own held-out blocks)."""
    ev = self.run.cfg.eval
    bs = ev.batch_size
    batches = [{k: _pad_rows(v[i:i + bs], bs) for k, v in blocks.items()}
               for i in range(0, len(blocks["mask"]), bs)]
    return likelihood.evaluate(
        self.run.process, self.run.graphdef, self.params, batches, 1, ev.seed,
        log=lambda m: None, mesh=sharding.mesh_from_config(self.run.cfg.train),
        batch_size=bs)


def _pad_rows(v: np.ndarray, rows: int) -> np.ndarray:
  return np.concatenate([v, np.zeros((rows - len(v),) + v.shape[1:], v.dtype)])


def retokenize_text(text: str, source_tok, judge_tok) -> list[int]:
  """Text written by `source_tok` -> ids of `judge_tok`; the string the
  source writes for EOS separates units, which become the judge's EOS."""
  eos_text = (source_tok.decode([source_tok.eos_id])
              if source_tok.eos_id is not None else None)
  if not eos_text or judge_tok.eos_id is None:
    return judge_tok.encode(text)
  out: list[int] = []
  for i, unit in enumerate(text.split(eos_text)):
    if i:
      out.append(judge_tok.eos_id)
    out.extend(judge_tok.encode(unit) if unit.strip() else [])
  return out


def generative_perplexity(judge: Judge, ids: Sequence[Sequence[int]],
                          tokenizer, retokenize: Optional[bool] = None) -> dict:
  """exp(NLL per token) of sequences under the judge, with its parts."""
  r = judge.score(judge.blocks(judge.to_judge_ids(ids, tokenizer, retokenize)))
  return {"gen_ppl": r["perplexity"], "gen_ppl_sem": r["perplexity_sem"],
          "gen_nll": r["nats_per_token"], "gen_nll_sem": r["nats_per_token_sem"],
          "judge_tokens": r["num_tokens"]}


# ---- drawing samples with their cost -----------------------------------------
class CallCounter:
  """Counts network calls as they execute (jax.debug.callback per call)."""

  def __init__(self):
    self.calls, self._lock = 0, threading.Lock()

  def hit(self):
    with self._lock:
      self.calls += 1

  def wrap(self, denoiser):
    def predict(*args, **kwargs):
      jax.debug.callback(self.hit)
      return denoiser.predict(*args, **kwargs)
    return dataclasses.replace(denoiser, predict=predict)


def draw(run: run_lib.Run, params, steps: int, num: int, length: int,
         seed: int) -> dict:
  """`num` samples with `steps` reverse steps, timed after compilation."""
  sc = dataclasses.replace(run.cfg.sample, steps=steps, num=num, seed=seed)
  counter = CallCounter()
  fn = samples.make_sampler(run.process, run.graphdef, sc, length,
                            wrap_denoiser=counter.wrap)
  key = jax.random.key(seed)
  t0 = time.time()
  compiled = fn.lower(key, params).compile()
  compile_s = time.time() - t0
  t0 = time.time()
  ids = np.asarray(jax.block_until_ready(compiled(key, params)))
  wall = time.time() - t0
  return {"ids": ids, "wall_s": wall, "compile_s": compile_s,
          "tokens_per_s": ids.size / max(wall, 1e-9),
          "network_calls": counter.calls}


def evaluate_samples(run: run_lib.Run, params, judge: Judge,
                     steps_list: Sequence[int], num: int,
                     log: Callable[[str], None] = print) -> list[dict]:
  """One row per step count (plus the held-out data as a reference row)."""
  sc = run.cfg.sample
  length = sc.length or run.cfg.data.seq_len
  tok = run.prepared.tokenizer
  rows = []
  for steps in steps_list:
    d = draw(run, params, steps, num, length, sc.seed)
    row = {"steps": steps, "num": num, "length": length,
           **generative_perplexity(judge, d["ids"], tok),
           **text_statistics(d["ids"]),
           **{k: d[k] for k in ("wall_s", "compile_s", "tokens_per_s",
                                "network_calls")},
           "samples": [tok.decode(r) for r in d["ids"][:2]]}
    log(f"[sample-eval] {steps:4d} steps: gen. perplexity {row['gen_ppl']:.1f}, "
        f"entropy {row['entropy']:.2f}, {row['network_calls']} network calls, "
        f"{row['tokens_per_s']:.0f} tokens/s")
    rows.append(row)
  rows.append(data_reference(run, judge, num, length))
  return rows


def data_reference(run: run_lib.Run, judge: Judge, num: int,
                   length: int) -> dict:
  """The same statistics on `num` held-out pieces of `length` tokens."""
  split = run.cfg.eval.split
  ids = []
  for batch in pipeline.eval_batches(run.prepared, split, num, 0):
    for toks, m in zip(batch["tokens"], batch["mask"]):
      if m[:length].all():
        ids.append(toks[:length])
    if len(ids) >= num:
      break
  ids = np.stack(ids[:num])
  return {"steps": None, "num": len(ids), "length": length, "split": split,
          **generative_perplexity(judge, ids, run.prepared.tokenizer),
          **text_statistics(ids)}


# ---- the command ---------------------------------------------------------------
def sample_eval_workdir(workdir, judge_dir, steps_list: Sequence[int] = (16, 64, 256),
                        num: int = 0, overrides=(), out: Optional[str] = None,
                        log: Callable[[str], None] = print,
                        judge: Optional[Judge] = None) -> dict:
  """`diffusion-text sample-eval`: writes sample_eval.json, .md and .png."""
  workdir = pathlib.Path(workdir)
  run, params, step = run_lib.open_workdir(workdir, overrides, log)
  judge = judge or Judge.open(judge_dir, log)
  num = num or run.cfg.sample.num
  log(f"[sample-eval] {run.cfg.process.name} step {step}: {num} samples at "
      f"{', '.join(map(str, steps_list))} steps; judge {judge_dir}")
  rows = evaluate_samples(run, params, judge, steps_list, num, log)
  result = {"process": run.cfg.process.name, "workdir": str(workdir),
            "step": step, "judge": judge.provenance(), "rows": rows,
            "config": config_lib.to_dict(run.cfg),
            "commit": likelihood.git_commit()}
  out_dir = pathlib.Path(out) if out else workdir
  out_dir.mkdir(parents=True, exist_ok=True)
  workdir_lib.atomic_write_json(out_dir / "sample_eval.json", result)
  table = report.quality_table({run.cfg.process.name: rows})
  (out_dir / "sample_eval.md").write_text(table)
  report.plot_quality({run.cfg.process.name: rows}, out_dir / "sample_eval.png")
  log("\n" + table)
  log(f"[sample-eval] written {out_dir}/sample_eval.json, sample_eval.md, "
      "sample_eval.png")
  return result
