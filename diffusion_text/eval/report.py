"""Paper-ready outputs: Markdown and LaTeX tables of NLL bounds, and plots.

Every likelihood column is labelled as a bound (<=): the framework never
reports a number that is not an upper bound on the NLL.
"""

from __future__ import annotations

import pathlib
from typing import Callable, Iterable


def _fmt_tokens(n: int) -> str:
  for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
    if n >= scale:
      return f"{n / scale:.1f}{unit}"
  return str(n)


def has_sem(value) -> bool:
  """Whether a standard error exists: one evaluation block has none (NaN
  in memory, null in the JSON)."""
  return value is not None and value == value


def sem_cell(value, digits: int) -> str:
  """A standard error for a table cell; "n/a" where none exists."""
  return f"{value:.{digits}f}" if has_sem(value) else "n/a"


def _best(rows: list[dict]) -> float:
  return min(r["result"]["nats_per_token"] for r in rows)


def _extra_columns(rows: list[dict]) -> list[tuple[str, str, Callable]]:
  """(Markdown head, LaTeX head, cell) of the columns the rows carry:
  the paired difference to the reference row and the generative quality."""
  cols = []
  ref = next((r["reference"] for r in rows if r.get("diff")), None)
  if ref is not None:
    cols.append((f"Δ NLL vs {ref} (paired SEM)", f"$\\Delta$ vs {ref}",
                 lambda r: (f"{r['diff']['diff_nats_per_token']:+.3f} ± " +
                            sem_cell(r["diff"]["diff_nats_per_token_sem"], 3))
                 if r.get("diff") else "ref."))
  if any(r.get("quality") for r in rows):
    cols.append(("gen. perplexity (steps)", "Gen. PPL",
                 lambda r: (f"{r['quality']['gen_ppl']:.1f} "
                            f"({r['quality']['steps']})")
                 if r.get("quality") else "–"))
    cols.append(("unigram entropy", "Entropy",
                 lambda r: f"{r['quality']['entropy']:.2f}"
                 if r.get("quality") else "–"))
  return cols


def markdown_table(rows: Iterable[dict], dataset: str) -> str:
  """rows: {'name', 'result' (likelihood.summarize dict), 'tokens_seen',
  'wall_s'} and optionally 'diff' (likelihood.paired_difference against
  row 'reference') and 'quality' (a sample-eval row); best bound in bold."""
  rows = list(rows)
  extra = _extra_columns(rows)
  head = (f"| model | NLL ≤ (nats/token) on {dataset} | bits/token ≤ | "
          "perplexity ≤ | tokens seen | train time |"
          + "".join(f" {c[0]} |" for c in extra) + "\n"
          + "|---" * (6 + len(extra)) + "|\n")
  lines = []
  for r in rows:
    res = r["result"]
    nll = (f"{res['nats_per_token']:.3f} ± "
           + sem_cell(res["nats_per_token_sem"], 3))
    if len(rows) > 1 and res["nats_per_token"] == _best(rows):
      nll = f"**{nll}**"
    lines.append(
        f"| {r['name']} | {nll} | {res['bits_per_token']:.3f} | "
        f"{res['perplexity']:.1f} ± {sem_cell(res['perplexity_sem'], 1)} | "
        f"{_fmt_tokens(r.get('tokens_seen', 0))} | {r.get('wall_s', 0):.0f} s |"
        + "".join(f" {c[2](r)} |" for c in extra))
  return head + "\n".join(lines) + "\n"


def latex_table(rows: Iterable[dict], dataset: str) -> str:
  rows = list(rows)
  extra = _extra_columns(rows)
  tex = lambda x: (x.replace("_", "\\_").replace("±", "$\\pm$")
                   .replace("–", "--"))

  def nll(r):
    cell = (f"{r['result']['nats_per_token']:.3f} \\pm "
            f"{sem_cell(r['result']['nats_per_token_sem'], 3)}")
    if len(rows) > 1 and r["result"]["nats_per_token"] == _best(rows):
      cell = f"\\mathbf{{{cell}}}"
    return f"$\\leq {cell}$"

  body = "\n".join(
      f"{tex(r['name'])} & {nll(r)} & "
      f"$\\leq {r['result']['perplexity']:.1f} \\pm "
      f"{sem_cell(r['result']['perplexity_sem'], 1)}$"
      + "".join(f" & {tex(c[2](r))}" for c in extra) + " \\\\"
      for r in rows)
  return (f"\\begin{{tabular}}{{lcc{'c' * len(extra)}}}\n\\toprule\n"
          f"Model & NLL (nats/token, {dataset}) & Perplexity"
          + "".join(f" & {c[1]}" for c in extra) + " \\\\\n\\midrule\n"
          f"{body}\n\\bottomrule\n\\end{{tabular}}\n")


def quality_table(series: dict[str, list[dict]]) -> str:
  """Generative quality per model and step count (sample-eval rows)."""
  head = ("| model | steps | gen. perplexity | unigram entropy | "
          "repeated 4-grams | network calls | tokens/s | wall time |\n"
          "|---|---|---|---|---|---|---|---|\n")
  lines = []
  for name, rows in series.items():
    for r in rows:
      steps = "data" if r["steps"] is None else str(r["steps"])
      cost = (f"{r['network_calls']} | {r['tokens_per_s']:.0f} | "
              f"{r['wall_s']:.2f} s" if r["steps"] is not None else "– | – | –")
      lines.append(f"| {name} | {steps} | {r['gen_ppl']:.1f} | "
                   f"{r['entropy']:.2f} | {r['repeated_4grams']:.3f} | {cost} |")
  return head + "\n".join(lines) + "\n"


def read_curve(workdir: str | pathlib.Path) -> list[dict]:
  """metrics.jsonl rows (a torn last line, from a kill, is ignored). Its
  `elapsed_s` is cumulative over resumed segments."""
  from diffusion_text import workdir as workdir_lib
  return workdir_lib.read_rows(pathlib.Path(workdir) / "metrics.jsonl")


def _figure(ncols: int = 1):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, ncols, figsize=(6.4 * ncols, 4.2), dpi=120,
                           squeeze=False)
  return plt, fig, axes[0]


def _save(plt, fig, paths) -> None:
  fig.tight_layout()
  for path in ([paths] if isinstance(paths, (str, pathlib.Path)) else paths):
    fig.savefig(path)
  plt.close(fig)


def plot_curves(curves: dict[str, list[dict]], path, title: str = "training curves",
                finals: dict[str, tuple[int, dict]] | None = None) -> None:
  """Training-batch NLL bound (nats/token) against tokens seen; `finals`
  ({name: (tokens seen, eval result)}) adds each held-out bound ± SEM.
  `path` may be a list (e.g. PNG and PDF)."""
  plt, fig, (ax,) = _figure()
  for i, (name, rows) in enumerate(curves.items()):
    color = f"C{i}"
    rows = [r for r in rows if "nll_bound" in r]
    if rows:
      ax.plot([r["tokens_seen"] for r in rows], [r["nll_bound"] for r in rows],
              label=name, marker=".", color=color)
    if finals and name in finals:
      tokens, res = finals[name]
      sem = res["nats_per_token_sem"]
      ax.errorbar([tokens], [res["nats_per_token"]],
                  yerr=[sem] if has_sem(sem) else None, fmt="*", ms=12,
                  color=color, capsize=3)
  ax.set_xlabel("tokens seen")
  ax.set_ylabel("training-batch NLL bound, mean per log interval\n"
                "(nats/token, ≤)" + ("; ★ held-out bound ± SEM" if finals else ""))
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend()
  _save(plt, fig, path)


def plot_quality(series: dict[str, list[dict]], path,
                 title: str = "generative quality") -> None:
  """Left: generative perplexity against unigram entropy, each point
  labelled by its step count (the held-out data as a star). Right:
  generative perplexity against the number of steps."""
  plt, fig, (ax, ax_steps) = _figure(2)
  for i, (name, rows) in enumerate(series.items()):
    color = f"C{i}"
    drawn = [r for r in rows if r["steps"] is not None]
    ax.plot([r["entropy"] for r in drawn], [r["gen_ppl"] for r in drawn],
            marker="o", color=color, label=name)
    for r in drawn:
      ax.annotate(str(r["steps"]), (r["entropy"], r["gen_ppl"]),
                  textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax_steps.plot([r["steps"] for r in drawn], [r["gen_ppl"] for r in drawn],
                  marker="o", color=color, label=name)
    for r in rows:
      if r["steps"] is None:
        ax.plot([r["entropy"]], [r["gen_ppl"]], marker="*", ms=12, color="k",
                linestyle="none", label="held-out text" if i == 0 else None)
  ax.set_xlabel("mean unigram entropy per sample (nats)")
  ax.set_ylabel("generative perplexity (AR judge)")
  ax.set_title(f"{title} (labels: steps)")
  ax_steps.set_xscale("log")
  ax_steps.set_xlabel("sampling steps")
  ax_steps.set_ylabel("generative perplexity (AR judge)")
  ax_steps.set_title("quality against steps")
  for a in (ax, ax_steps):
    a.set_yscale("log")
    a.grid(alpha=0.3)
    a.legend(fontsize=8)
  _save(plt, fig, path)
