"""Memory account of the end-to-end learned prune: what one training step holds, by role, per block.

Random LLaMA models at LLaMA-2-7B width (hidden 4096, MLP 11008, 32 heads, vocab 32000; or the
13B / 70B shapes) with 1 and 2 decoder blocks, bfloat16, learned 2:4, G = 4, synchronised sites,
the default trainer (bf16 autocast, averages 0.8/0.9 and the tail mean, teacher forward every
step), on whatever device is given (CPU here: memory is deterministic, so the account at these
widths is a measurement; time is not). Magnitude scores and an identity-biased start (the
calibration and the heuristic search do not change what a step holds).

The account is taken at the end of the third step's loss (the forward's peak: everything the
backward needs is held), from the tensors themselves: the trainer's state objects (found by
type), the bank's outputs (a forward hook), the teacher's and the student's logits (a forward
hook on the model) and every tensor autograd saves for the backward
(``torch.autograd.graph.saved_tensors_hooks``), each storage counted once, in the first role
that holds it. Per block = the 2-block run less the 1-block run; the rest is the embedding, the
head, the logits and the teacher. Transients inside a phase (e.g. the backward's own) are not
in the account; on CUDA ``peak_gib`` adds ``torch.cuda.max_memory_allocated``.

    python bench/memory.py                                  # bench/results/memory.{json,md}
    python bench/memory.py --src /tmp/base/src --label before   # the same account of another checkout
    python bench/memory.py --shapes 13b,70b --blocks 1 --tokens 256   # bigger widths, one block

Rows are keyed by (label, shape, blocks, tokens, activation checkpointing); a run replaces its own rows.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path
from settings import NO_BUDGET  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

SHAPES = {
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32, blocks=32),
    "13b": dict(hidden_size=5120, intermediate_size=13824, num_attention_heads=40, num_key_value_heads=40, blocks=40),
    "70b": dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8, blocks=80),
}
VOCAB = 32000
#: Roles in the order a storage is claimed; ``on_gpu`` says whether the library keeps that role on
#: the device when training on CUDA (the averages and the last good costs: on the host since
#: HostMirror; the snapshots are plans of int64 indices on the host in both).
ROLES = ("weights", "costs", "masks", "scores", "moments", "grads", "good", "averages", "bank_out",
         "sinkhorn_saved", "w_eff", "activations", "logits", "teacher", "other")
PER_STEP = ("bank_out", "sinkhorn_saved", "w_eff", "activations", "logits", "teacher", "other")


class Account:
    """Storages by role: ``claim(role, tensor)`` counts a storage once, for the first role."""

    def __init__(self) -> None:
        self.seen: dict[int, str] = {}
        self.bytes = {r: 0 for r in ROLES}

    def claim(self, role: str, t) -> None:
        import torch

        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return
        st = t.untyped_storage()
        if st.nbytes() == 0 or st.data_ptr() in self.seen:
            return
        self.seen[st.data_ptr()] = role
        self.bytes[role] += st.nbytes()

    def claim_all(self, role: str, tensors) -> None:
        for t in tensors:
            self.claim(role, t)


def _tensors(obj):
    """Tensors in nested dicts/lists/tuples (and a HostMirror's buffers)."""
    import torch

    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)
    elif hasattr(obj, "buffers") and isinstance(getattr(obj, "buffers"), dict):
        yield from _tensors(obj.buffers)


class Probe:
    """Installed around one training step: records saved tensors by phase and the logits, and
    takes the account at the end of the chosen step's loss."""

    def __init__(self, model, at_step: int = 1) -> None:
        import torch

        self.model, self.at_step = model, at_step
        self.phase = None
        self.saved: list[tuple[str, object]] = []
        self.logits: dict[str, object] = {}
        self.bank_out = None
        self.account: Account | None = None
        self.where: dict[str, str] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._handles = [model.register_forward_hook(self._model_out)]
        for layer in model.model.layers:  # each block's input: what a checkpointed block keeps
            self._handles.append(layer.register_forward_pre_hook(self._block_in))

    def _pack(self, t):
        if self.phase is not None:
            self.saved.append((self.phase, t))
        return t

    def _model_out(self, module, args, out):
        if self.phase in ("teacher", "forward"):
            self.logits[self.phase] = getattr(out, "logits", None)

    def _block_in(self, module, args):
        if self.phase == "forward" and args:
            self.saved.append(("forward", args[0]))

    def _bank_out(self, module, args, out):
        self.bank_out = out

    # -- the trainer's callback protocol (duck-typed: works on any checkout with phases) --
    def on_train_begin(self, state) -> None:
        self._handles.append(state.bank.register_forward_hook(self._bank_out))

    def on_phase_begin(self, state, name: str) -> None:
        if state.step != self.at_step:
            return
        if name == "bank":
            self._hooks.__enter__()
        self.phase = name

    def on_phase_end(self, state, name: str) -> None:
        if state.step != self.at_step:
            return
        if name == "loss":
            self._hooks.__exit__(None, None, None)
            self.phase = None
            self.account = self._take(state)
            self.saved, self.logits, self.bank_out = [], {}, None

    def on_step_end(self, state, log) -> None:
        pass

    def on_train_end(self, state) -> None:
        pass

    def close(self) -> None:
        for h in self._handles:
            h.remove()

    def state_dict(self):
        return {}, {}

    def load_state_dict(self, tensors, meta) -> None:
        pass

    def _take(self, state) -> Account:
        from permsparse.train import callbacks, loop

        acc = Account()
        run = next(o for o in gc.get_objects() if isinstance(o, loop._Run))
        avgs = [o for o in gc.get_objects() if isinstance(o, callbacks.Averages)]
        acc.claim_all("weights", self.model.parameters())
        acc.claim_all("costs", state.bank.parameters())
        acc.claim_all("masks", (m for _, m in run.masks.values()))
        acc.claim_all("scores", state.scores.values())
        acc.claim_all("moments", _tensors([dict(s) for s in state.opt.state.values()]))
        acc.claim_all("grads", (p.grad for p in state.bank.parameters() if p.grad is not None))
        acc.claim_all("good", _tensors(run.good))
        for a in avgs:
            acc.claim_all("averages", _tensors([a.ema, a.tail_mean]))
        acc.claim_all("bank_out", _tensors(self.bank_out))
        shapes = {tuple(w.shape) for w in state.weights.values()}
        for phase, t in self.saved:
            if phase == "bank":
                acc.claim("sinkhorn_saved", t)
            elif phase in ("weights", "forward") and tuple(t.shape) in shapes and t.dtype != _bool():
                acc.claim("w_eff", t)
            elif phase in ("teacher", "forward", "weights"):
                acc.claim("activations", t)
            else:
                acc.claim("logits", t)
        student = self.logits.get("forward")
        acc.claim("logits", student)
        acc.claim("teacher", self.logits.get("teacher"))
        if student is not None:  # a cached teacher's logits, brought to the device for this step
            import torch

            acc.claim_all("teacher", (o for o in gc.get_objects() if isinstance(o, torch.Tensor)
                                      and o.shape == student.shape and o.device == student.device))
        # On a GPU the HostMirror keeps the last good costs on the host, and so do the averages.
        self.where = {"good": "host" if type(run.good).__name__ == "HostMirror" else "device",
                      "averages": "host" if any(hasattr(a, "on_host") for a in avgs) else "device"}
        return acc


def _bool():
    import torch

    return torch.bool


def measure(shape: str, blocks: int, tokens: int, batch: int, ckpt: bool, device: str) -> dict:
    import torch
    import transformers

    from permsparse.config import LearnConfig
    from permsparse.core.pattern import NMPattern
    from permsparse.core.scores import compute_score
    from permsparse.models.sites import find_sites
    from permsparse.train.loop import train_end_to_end

    torch.manual_seed(0)
    s = SHAPES[shape]
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=s["hidden_size"],
                                   intermediate_size=s["intermediate_size"], num_hidden_layers=blocks,
                                   num_attention_heads=s["num_attention_heads"],
                                   num_key_value_heads=s["num_key_value_heads"],
                                   max_position_embeddings=max(tokens, 128), initializer_range=0.02)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    sites = find_sites(model)
    scores = {c: compute_score("magnitude", model.get_submodule(c).weight.detach()) for st in sites
              for c in st.consumers}
    calib = torch.randint(3, VOCAB, (3 * batch, tokens), generator=torch.Generator().manual_seed(0))
    kw = dict(batch_size=batch, epochs=1.0, init="identity", teacher_cache_gb=0.0, snapshots=0)
    if ckpt:
        kw["activation_checkpointing"] = True
    learn = LearnConfig(**{**NO_BUDGET, **kw})
    probe = Probe(model, at_step=2)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    train_end_to_end(model, sites, scores, NMPattern.parse("2:4"), 4, calib, learn, progress=False,
                     callbacks=[probe])
    seconds = time.perf_counter() - t0
    acc = probe.account
    row = {"shape": shape, "blocks": blocks, "tokens": tokens, "batch": batch, "activation_checkpointing": ckpt,
           "device": device, "sites": len(sites), "seconds": round(seconds, 1), "where": probe.where}
    row.update({f"{r}_gib": round(b / 2**30, 4) for r, b in acc.bytes.items()})
    if device.startswith("cuda"):
        row["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    del model, probe
    gc.collect()
    return row


def shape_account(shape: str, groups: int = 4) -> dict:
    """Per block, the bytes of the roles that do not depend on the batch, computed from the sites'
    shapes on a model built on the meta device (no memory): ``costs`` (free groups x k² float32),
    ``moments`` (GroupAdam: one float32 copy and a scalar per group), ``grads``, ``good``,
    ``averages`` (two decays and the tail mean: three copies), ``masks`` (bool), ``scores``
    (float32) and ``w_eff`` (bf16) of every pruned weight. At 7B the same sums are the measured
    rows' (the markdown shows both)."""
    import torch
    import transformers

    from permsparse.core.pattern import NMPattern
    from permsparse.models.sites import find_sites

    s = SHAPES[shape]
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=s["hidden_size"],
                                   intermediate_size=s["intermediate_size"], num_hidden_layers=1,
                                   num_attention_heads=s["num_attention_heads"],
                                   num_key_value_heads=s["num_key_value_heads"])
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(cfg)
    pat = NMPattern.parse("2:4")
    sites = find_sites(model)
    cost = sum(st.free_groups(groups) * st.structure(groups, pat)[1] ** 2 for st in sites) * 4
    n_groups = sum(st.free_groups(groups) for st in sites)
    weights = sum(model.get_submodule(c).weight.numel() for st in sites for c in st.consumers)
    block = sum(p.numel() for p in model.model.layers[0].parameters())
    gib = 2**30
    return {"shape": shape, "blocks": s["blocks"], "costs": cost / gib, "moments": (cost + 4 * n_groups) / gib,
            "grads": cost / gib, "good": cost / gib, "averages": 3 * cost / gib, "masks": weights / gib,
            "scores": 4 * weights / gib, "w_eff": 2 * weights / gib, "block_weights": 2 * block / gib,
            "other_weights": 2 * (sum(p.numel() for p in model.parameters()) - block) / gib}


def _child(spec: dict) -> None:
    """One row in this process (a fresh one per row: each measures its own tensors)."""
    if spec.get("src"):
        sys.path.insert(0, spec["src"])
    else:
        sys.path.insert(0, str(ROOT / "src"))
    import torch

    torch.set_num_threads(spec.get("threads", torch.get_num_threads()))
    row = measure(spec["shape"], spec["blocks"], spec["tokens"], spec["batch"], spec["ckpt"], spec["device"])
    row["label"] = spec["label"]
    Path(spec["out"]).write_text(json.dumps(row))


def per_block(rows: list[dict]) -> list[dict]:
    """From the 1- and 2-block rows of each setting: the per-block bytes of each role, the rest,
    and the account at the shape's full depth (rest + depth x per block: every block holds the
    same tensors, so this is arithmetic on measured sizes, not an extrapolation of time)."""
    out = []
    key = lambda r: (r["label"], r["shape"], r["tokens"], r["batch"], r["activation_checkpointing"])
    groups: dict[tuple, dict[int, dict]] = {}
    for r in rows:
        groups.setdefault(key(r), {})[r["blocks"]] = r
    for k, by in groups.items():
        if 1 not in by or 2 not in by:
            continue
        one, two = by[1], by[2]
        depth = SHAPES[one["shape"]]["blocks"]
        block = {ro: two[f"{ro}_gib"] - one[f"{ro}_gib"] for ro in ROLES}
        rest = {ro: one[f"{ro}_gib"] - block[ro] for ro in ROLES}
        full = {ro: rest[ro] + depth * block[ro] for ro in ROLES}
        on_gpu = [ro for ro in ROLES if ro != "weights" and one["where"].get(ro, "device") == "device"]
        out.append({"label": one["label"], "shape": one["shape"], "tokens": one["tokens"], "batch": one["batch"],
                    "activation_checkpointing": one["activation_checkpointing"], "depth": depth,
                    "per_block": {ro: round(v, 4) for ro, v in block.items()},
                    "rest": {ro: round(v, 4) for ro, v in rest.items()},
                    "full": {ro: round(v, 3) for ro, v in full.items()},
                    "full_on_gpu_gib": round(sum(full[ro] for ro in on_gpu), 2),
                    "full_host_gib": round(sum(full[ro] for ro in ROLES if ro not in on_gpu and ro != "weights"), 2),
                    "where": one["where"]})
    return out


LABELS = {"weights": "weights (bf16)", "costs": "cost tables (float32)", "masks": "masks (cached, bool)",
          "scores": "scores (float32, the caller's)", "moments": "optimizer moments", "grads": "cost gradients",
          "good": "last good costs", "averages": "exponential averages + tail mean",
          "bank_out": "straight-through matrices (bank output)", "sinkhorn_saved": "Sinkhorn tensors saved for the backward",
          "w_eff": "W_eff kept for the backward", "activations": "activations saved for the backward",
          "logits": "student logits (saved by the loss)", "teacher": "teacher logits", "other": "other"}


def markdown(rows: list[dict], blocks: list[dict], meta: dict, shapes: list[dict] = ()) -> str:
    lines = [
        "# Memory account of the end-to-end learned prune",
        "",
        f"Generated by `python bench/memory.py` ({meta['host']}, torch {meta['torch']}; last run {meta['created']}).",
        "",
        "Random LLaMA models (vocab 32000) in bfloat16, learned 2:4, G = 4, synchronised sites, the default trainer "
        "(bf16 autocast, averages 0.8/0.9 + tail mean, a teacher forward every step), measured on the device named "
        "per row. The account is what the third of three steps holds at the end of its loss (the forward's peak), from the "
        "tensors themselves (the trainer's state, the bank's and the model's outputs, and every tensor autograd saves "
        "for the backward), each storage counted once. Per block = the 2-block run less the 1-block run. "
        "*Full depth* = the rest + depth x per block (32 blocks for 7B, 40 for 13B, 80 for 70B): every block holds "
        "the same tensors, so that is arithmetic on measured sizes. `on GPU` counts what the library keeps on the "
        "device when it trains on CUDA (the weights apart); `host` what it keeps on the host there. "
        "Transients inside a phase are not in the account (on CUDA, `peak` is `torch.cuda.max_memory_allocated`).",
        "",
    ]
    for b in blocks:
        lines += [f"## {b['shape']}, {b['batch']} x {b['tokens']} tokens, {b['label']}"
                  f"{', activation checkpointing' if b['activation_checkpointing'] else ''}", "",
                  "| role | per block GiB | rest GiB | full depth GiB | where on a GPU run |",
                  "| --- | ---: | ---: | ---: | --- |"]
        for ro in ROLES:
            if abs(b["full"][ro]) < 5e-4:
                continue
            where = "device" if ro == "weights" else b["where"].get(ro, "device")
            lines.append(f"| {LABELS[ro]} | {b['per_block'][ro]:.3f} | {b['rest'][ro]:.3f} | {b['full'][ro]:.2f} | "
                         f"{where} |")
        lines += ["", f"Full depth ({b['depth']} blocks), beside the weights: **{b['full_on_gpu_gib']:.1f} GiB on the "
                  f"GPU**, {b['full_host_gib']:.1f} GiB on the host.", ""]
    if blocks:
        lines += ["## At the issue's batches (token roles scaled: an estimate)", "",
                  "The roles that scale with the tokens (activations, student and teacher logits) taken from the "
                  "rows above and multiplied by the token ratio (linear: the attention keeps its output and "
                  "log-sum-exp, not a T x T matrix); the rest as measured. Full depth, GiB beside the weights.", "",
                  "| setting | measured at | 1 x 2048 on GPU | 4 x 2048 on GPU | on the host |",
                  "| --- | --- | ---: | ---: | ---: |"]
        for b in blocks:
            tok = sum(b["full"][ro] for ro in ("activations", "logits", "teacher"))
            fixed = b["full_on_gpu_gib"] - tok
            scale = lambda n: fixed + tok * n / (b["batch"] * b["tokens"])
            lines.append(f"| {b['shape']}, {b['label']}{', activation checkpointing' if b['activation_checkpointing'] else ''} | "
                         f"{b['batch']} x {b['tokens']} | {scale(2048):.1f} | {scale(8192):.1f} | "
                         f"{b['full_host_gib']:.1f} |")
        lines.append("")
    if shapes:
        roles = ("costs", "moments", "grads", "good", "averages", "masks", "scores", "w_eff")
        lines += ["## Per block from the shapes (7B, 13B, 70B)", "",
                  "The batch-free roles of one block, summed from the sites' shapes (a model on the meta device): "
                  "the 7B column is the measured per-block rows' above to the byte. Activations are not in it (they "
                  "depend on the batch: measured rows only).", "",
                  "| GiB per block | " + " | ".join(sh["shape"] for sh in shapes) + " |",
                  "| --- |" + " ---: |" * len(shapes)]
        for ro in roles + ("block_weights", "other_weights"):
            name = {"block_weights": "the block's weights (bf16)", "other_weights": "embedding + head (bf16, once)"}
            lines.append(f"| {name.get(ro, LABELS.get(ro, ro))} | " + " | ".join(f"{sh[ro]:.3f}" for sh in shapes)
                         + " |")
        lines.append("")
    lines += ["## Rows measured", "",
              "| label | shape | blocks | tokens | ckpt | device | seconds | sum GiB (no weights) | peak GiB |",
              "| --- | --- | ---: | ---: | --- | --- | ---: | ---: | ---: |"]
    for r in rows:
        total = sum(r[f"{ro}_gib"] for ro in ROLES if ro != "weights")
        lines.append(f"| {r['label']} | {r['shape']} | {r['blocks']} | {r['batch']} x {r['tokens']} | "
                     f"{'yes' if r['activation_checkpointing'] else 'no'} | {r['device']} | {r['seconds']} | "
                     f"{total:.3f} | {r.get('peak_gib', '')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    import subprocess
    import tempfile

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="7b")
    ap.add_argument("--blocks", default="1,2")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--ckpt", default="no,yes", help="activation checkpointing settings to run: no, yes or both")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--src", default=None, help="measure the library in this src/ folder instead")
    ap.add_argument("--label", default="now")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--render", action="store_true", help="only rewrite the markdown from memory.json")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        _child(json.loads(args.child))
        return 0
    path = args.out / "memory.json"
    rows = json.loads(path.read_text())["rows"] if path.exists() else []
    for shape in ([] if args.render else args.shapes.split(",")):
        for ckpt in (c == "yes" for c in args.ckpt.split(",")):
            for blocks in (int(b) for b in args.blocks.split(",")):
                with tempfile.TemporaryDirectory() as tmp:
                    spec = dict(shape=shape, blocks=blocks, tokens=args.tokens, batch=args.batch, ckpt=ckpt,
                                device=args.device, src=args.src, label=args.label, out=f"{tmp}/row.json")
                    subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], check=True)
                    row = json.loads(Path(spec["out"]).read_text())
                print(json.dumps(row), flush=True)
                same = lambda r: all(r.get(k) == row[k] for k in ("label", "shape", "blocks", "tokens", "batch",
                                                                   "activation_checkpointing", "device"))
                rows = [r for r in rows if not same(r)] + [row]
    import torch

    from permsparse.io.atomic import atomic_write_json, atomic_write_text  # noqa: E402

    meta = {"created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "torch": torch.__version__,
            "host": f"{platform.machine()}, {os.cpu_count()} CPUs"}
    blocks = per_block(rows)
    shapes = [shape_account(sh) for sh in SHAPES]
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, {"rows": rows, "per_block": blocks, "shapes": shapes, "meta": meta})
    atomic_write_text(args.out / "memory.md", markdown(rows, blocks, meta, shapes))
    print(markdown(rows, blocks, meta, shapes))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "src"))
    raise SystemExit(main())
