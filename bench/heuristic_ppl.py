"""The heuristic's settings judged by held-out perplexity (not by the retained score alone).

    python bench/heuristic_ppl.py          # about 10 minutes on 2 idle CPU cores

SmolLM2-135M-Instruct, Wanda 2:4, one permutation per layer, 32 calibration windows of 512
tokens, the embedded Wikipedia's last 32,768 tokens. One calibration per setting (each row is
``permsparse.prune`` with ``permutation="heuristic"``); the rows vary the groups G, the power p
of the kept ``Σ score^p``, how ``o_proj``'s permutation is paid (folded into ``v_proj``: one
permutation per head, tied across a KV group; gathered: any permutation) and reconstruction.
Writes ``bench/results/heuristic_ppl.{json,md}``.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from permsparse.api import prune  # noqa: E402
from permsparse.config import PruneConfig  # noqa: E402
from permsparse.data.text import load_text_windows  # noqa: E402
from permsparse.evaluate import perplexity  # noqa: E402
from permsparse.io.atomic import atomic_write_json, atomic_write_text  # noqa: E402
from permsparse.models.loading import load_model  # noqa: E402
from permsparse.report import markdown_table  # noqa: E402

#: (groups, power, attn_out, reconstruct)
SETTINGS = [
    (4, 2.0, "fold", False),  # the defaults before 0.2
    (4, 2.0, "gather", False),
    (1, 1.0, "gather", False),  # the reference recipe: global, plain Σ score
    (4, 2.0, "gather", True),  # the defaults since 0.2
    (1, 1.0, "gather", True),
]
COLUMNS = ["groups", "power", "o_proj", "reconstruct", "ppl", "gap_closed", "seconds"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(HERE / "results"))
    opts = ap.parse_args()
    torch.manual_seed(0)
    dense, tok = load_model("smollm2-135m")
    windows = load_text_windows("wikipedia", tok, 512, 32, 0, eval_tokens=32768)
    refs = {}
    for name, pattern in (("wanda", "2:4"), ("unstructured50", "unstructured50")):
        model = copy.deepcopy(dense)
        prune(model, config=PruneConfig(pattern=pattern, permutation="none", reconstruct=False, progress=False),
              calib=windows.calib)
        refs[name] = perplexity(model, windows.eval, progress=False)
        print(name, refs[name], flush=True)
    rows = []
    for groups, power, attn_out, recon in SETTINGS:
        model = copy.deepcopy(dense)
        cfg = PruneConfig(pattern="2:4", permutation="heuristic", groups=groups, heuristic_power=power,
                          attn_out=attn_out, reconstruct=recon, sync=False, progress=False)
        t0 = time.perf_counter()
        prune(model, config=cfg, calib=windows.calib)
        seconds = time.perf_counter() - t0
        ppl = perplexity(model, windows.eval, progress=False)
        rows.append({"groups": groups, "power": power, "o_proj": attn_out, "reconstruct": recon, "ppl": round(ppl, 2),
                     "gap_closed": round((refs["wanda"] - ppl) / (refs["wanda"] - refs["unstructured50"]), 4),
                     "seconds": round(seconds, 1)})
        print(rows[-1], flush=True)
    out = Path(opts.out)
    meta = {"command": "python bench/heuristic_ppl.py", "wanda": refs["wanda"], "unstructured50": refs["unstructured50"],
            "machine": f"{platform.machine()}, {os.cpu_count()} cores", "date": time.strftime("%Y-%m-%d")}
    atomic_write_json(out / "heuristic_ppl.json", {"rows": rows, "meta": meta})
    atomic_write_text(out / "heuristic_ppl.md", (
        "# The heuristic judged by perplexity\n\n"
        f"Command: `{meta['command']}`\n\n"
        "SmolLM2-135M-Instruct, Wanda 2:4, one permutation per layer, 32 calibration windows of 512 tokens, "
        "held-out perplexity on the embedded Wikipedia's last 32,768 tokens. `o_proj`: its permutation folded "
        "into `v_proj` (one per head, tied across a KV group) or gathered (any). gap_closed against Wanda "
        f"{refs['wanda']:.1f} and unstructured 50 % {refs['unstructured50']:.1f} (both without reconstruction). "
        "`seconds`: the prune's wall time, on a machine that may be running other work. "
        f"Machine: {meta['machine']}. {meta['date']}.\n\n" + markdown_table(rows, COLUMNS)))


if __name__ == "__main__":
    main()
