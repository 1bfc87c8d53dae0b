"""Write ``docs/reliability.md``: the cases of ``tests/test_reliability.py`` and their outcomes.

    python tests/reliability_table.py          # writes docs/reliability.md
    python tests/reliability_table.py --check  # exit 1 if the committed file is not what it would write

Each row comes from a test (``@case`` / ``table`` in ``tests/test_reliability.py``), so the
table says only what the suite checks; ``test_the_docs_table_is_current`` fails when the two
drift apart.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "reliability.md"

#: The issue's items, as the table groups them.
ITEMS = {
    1: "Data loss: `--overwrite`",
    2: "Data loss: `--checkpoint`",
    3: "Silently wrong results: a plan that does not fit",
    5: "Silently wrong results: meaningless settings",
    7: "Tracebacks: corrupt files, OSErrors, Ctrl-C",
    8: "Tracebacks: tampered plan fields",
    9: "Tracebacks: impossible settings",
    11: "Unclear messages",
    12: "Leftovers and history",
}

HEADER = """\
# Reliability: mistakes a user makes, and what permsparse does

permsparse never touches a user's own files, never hands back a model that computes something
other than its plan says, and answers every mistake with one line on stderr: exit status 2
when something the user gave is wrong (a value, a path, a file), 1 for a failure at run time
(a diverging loss, out of memory, a full disk), 130 for Ctrl-C, which also prints the command
that continues the run when a checkpoint was saved. The traceback is printed only with `-v`.

The rules behind the table:

* **Outputs.** `--out` (and `permsparse.export`) writes a folder that does not exist, an empty
  one, or, with `--overwrite`, one that holds a previous export and nothing else: an export
  lists its files in `permsparse.json` (`files`), and a folder holding anything not on that list
  is never replaced. Neither is the model's own folder, the current folder, or a folder that
  contains either. `--out` and `--checkpoint` are checked for writability before any model is
  read. A killed export's hidden `.OUT.tmp-PID.*` folder is removed by the next run writing to
  `OUT` once that process is gone.
* **Checkpoints.** `--checkpoint FILE` must be a file outside `--out`; an existing one must be a
  permsparse checkpoint of this very run (the command line writes a hash of the model, data and
  settings into it), which `--resume` continues and a run without `--resume` starts over. Any
  other existing file is refused, with or without `--resume`.
* **Plans.** `permsparse.json` is validated field by field on load (types, ranges, head ties),
  against the model's layers and widths, and once by what it computes: the stock model and the
  model with the plan deployed run one random 16-token input, and their outputs must agree
  within the rounding of the parameters' dtype (relative Frobenius difference under 1e-3 in
  float32, 5e-2 in bfloat16, 2e-2 in float16). On the embedded SmolLM2-135M (2:4, heuristic,
  G = 2, all 120 sites permuted) rounding alone gives 1.5e-6 in float32 and 1.5e-2 in bfloat16;
  one tampered site (another norm, a consumer or a producer dropped, in the first or last
  block) gives 0.12 to 1.7. With `deploy=False` the plan is deployed, compared and undone
  exactly, so `from_pretrained` still returns the stock model bit for bit.
* **Settings** that would run but mean nothing (a guard on no batches, a negative KL weight,
  NaN or infinite numbers, zero iterations) are refused by the config itself, so the library
  refuses them too.

The table is generated from `tests/test_reliability.py` by `python tests/reliability_table.py`;
every row is a test.
"""


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render(rows: Sequence) -> str:
    """The Markdown of ``docs/reliability.md`` for ``rows`` (:class:`test_reliability.Row`)."""
    lines = [HEADER]
    for item in sorted({r.item for r in rows}):
        lines += ["", f"## {item}. {ITEMS.get(item, 'Other')}", "", "| Case | Outcome | Test |", "| --- | --- | --- |"]
        lines += [f"| {_cell(r.case)} | {_cell(r.outcome)} | `{r.test}` |" for r in rows if r.item == item]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str]) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_reliability import ROWS

    text = render(ROWS)
    if "--check" in argv:
        same = DOC.is_file() and DOC.read_text(encoding="utf-8") == text
        print(f"{DOC} is {'current' if same else 'out of date: run python tests/reliability_table.py'}")
        return 0 if same else 1
    from permsparse.io.atomic import atomic_write_text

    atomic_write_text(DOC, text)
    print(f"wrote {DOC} ({len(ROWS)} cases)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
