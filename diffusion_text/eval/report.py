"""Paper-ready outputs: Markdown and LaTeX tables of NLL bounds, and plots.

Every likelihood column is labelled as a bound (<=): the framework never
reports a number that is not an upper bound on the NLL.
"""

from __future__ import annotations

import pathlib
from typing import Iterable


def _fmt_tokens(n: int) -> str:
  for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
    if n >= scale:
      return f"{n / scale:.1f}{unit}"
  return str(n)


def markdown_table(rows: Iterable[dict], dataset: str) -> str:
  """rows: {'name', 'result' (likelihood.summarize dict), 'tokens_seen',
  'wall_s'}."""
  head = (f"| model | NLL ≤ (nats/token) on {dataset} | bits/token ≤ | "
          "perplexity ≤ | tokens seen | train time |\n"
          "|---|---|---|---|---|---|\n")
  lines = []
  for r in rows:
    res = r["result"]
    lines.append(
        f"| {r['name']} | {res['nats_per_token']:.3f} ± "
        f"{res['nats_per_token_sem']:.3f} | {res['bits_per_token']:.3f} | "
        f"{res['perplexity']:.1f} ± {res['perplexity_sem']:.1f} | "
        f"{_fmt_tokens(r.get('tokens_seen', 0))} | {r.get('wall_s', 0):.0f} s |")
  return head + "\n".join(lines) + "\n"


def latex_table(rows: Iterable[dict], dataset: str) -> str:
  body = "\n".join(
      f"{r['name'].replace('_', chr(92) + '_')} & "
      f"$\\leq {r['result']['nats_per_token']:.3f} \\pm "
      f"{r['result']['nats_per_token_sem']:.3f}$ & "
      f"$\\leq {r['result']['perplexity']:.1f} \\pm "
      f"{r['result']['perplexity_sem']:.1f}$ \\\\" for r in rows)
  return ("\\begin{tabular}{lcc}\n\\toprule\n"
          f"Model & NLL (nats/token, {dataset}) & Perplexity \\\\\n\\midrule\n"
          f"{body}\n\\bottomrule\n\\end{{tabular}}\n")


def read_curve(workdir: str | pathlib.Path) -> list[dict]:
  """metrics.jsonl rows (a torn last line, from a kill, is ignored). Its
  `elapsed_s` is cumulative over resumed segments."""
  from diffusion_text import workdir as workdir_lib
  return workdir_lib.read_rows(pathlib.Path(workdir) / "metrics.jsonl")


def plot_curves(curves: dict[str, list[dict]], path: str | pathlib.Path,
                title: str = "training curves") -> None:
  """Training-batch NLL bound (nats/token) against tokens seen."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
  for name, rows in curves.items():
    rows = [r for r in rows if "nll_bound" in r]
    if rows:
      ax.plot([r["tokens_seen"] for r in rows], [r["nll_bound"] for r in rows],
              label=name, marker=".")
  ax.set_xlabel("tokens seen")
  ax.set_ylabel("training-batch NLL bound, mean per log interval\n(nats/token, ≤)")
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
