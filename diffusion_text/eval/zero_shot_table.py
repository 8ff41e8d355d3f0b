"""Zero-shot tables in the layout of SEDD's Table 1 (Lou et al. 2024).

Models are rows and sets columns; every cell is a perplexity upper bound
(≤) with its standard error (±), and the best (lowest) bound of each column
is bold. `compare` joins the zero_shot.json of several workdirs.
"""

from __future__ import annotations

import json
import pathlib
from typing import Sequence

from diffusion_text.config import ConfigError
from diffusion_text.eval import report

COLUMNS = {"lambada": "LAMBADA", "wikitext2": "WikiText2", "ptb": "PTB",
           "wikitext103": "WikiText103", "lm1b": "1BW"}


def _grid(results: Sequence[dict]) -> tuple[list[str], list[str], dict]:
  """(row names, set columns present, best bound per column)."""
  names = [f"{r['model']} ({r['process']}, {r['manifest']['protocol']['name']})"
           for r in results]
  cols = [c for c in COLUMNS if any(c in r["sets"] for r in results)]
  best = {c: min(r["sets"][c]["perplexity_bound"] for r in results
                 if c in r["sets"]) for c in cols}
  return names, cols, best


def _cell(entry: dict | None, best: float, bold: str, pm: str, le: str) -> str:
  if entry is None:
    return "–"
  text = (f"{le} {entry['perplexity_bound']:.2f} {pm} "
          f"{report.sem_cell(entry['perplexity_sem'], 2)}")
  return bold.format(text) if entry["perplexity_bound"] == best else text


def markdown(results: Sequence[dict]) -> str:
  names, cols, best = _grid(results)
  head = ("| model | " + " | ".join(COLUMNS[c] for c in cols) + " |\n"
          + "|---" * (len(cols) + 1) + "|\n")
  rows = [f"| {name} | " + " | ".join(
      _cell(r["sets"].get(c), best[c], "**{}**", "±", "≤") for c in cols)
          + " |" for name, r in zip(names, results)]
  note = ("\nPerplexity upper bounds (≤) ± standard error over blocks; "
          "best per column in bold.\n")
  return head + "\n".join(rows) + "\n" + note


def latex(results: Sequence[dict]) -> str:
  names, cols, best = _grid(results)
  esc = lambda s: s.replace("_", "\\_")
  head = ("\\begin{tabular}{l" + "c" * len(cols) + "}\n\\toprule\n"
          "Model & " + " & ".join(COLUMNS[c] for c in cols) + " \\\\\n"
          "\\midrule\n")
  rows = [esc(name) + " & " + " & ".join(
      _cell(r["sets"].get(c), best[c], "\\textbf{{{}}}", "$\\pm$", "$\\le$")
      for c in cols) + " \\\\" for name, r in zip(names, results)]
  return head + "\n".join(rows) + "\n\\bottomrule\n\\end{tabular}\n"


def tables(results: Sequence[dict]) -> tuple[str, str]:
  return markdown(results), latex(results)


def compare(workdirs: Sequence[str]) -> tuple[str, str]:
  """One table over the zero_shot.json of several workdirs."""
  results = []
  for wd in workdirs:
    path = pathlib.Path(wd) / "zero_shot.json"
    if not path.exists():
      raise ConfigError(f"{wd} has no zero_shot.json; run `diffusion-text "
                        f"eval --suite zero-shot --workdir {wd}` first")
    results.append(json.loads(path.read_text()))
  return tables(results)


__all__ = ["COLUMNS", "compare", "latex", "markdown", "tables"]
