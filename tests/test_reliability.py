"""Issue 16: what a hostile but realistic user does wrong, and what permsparse does about it.

Every test is one row (or, parametrised, several rows) of the table in
``docs/reliability.md``: the ``@case`` decorator and :func:`table` register the case and the
outcome the test checks, and ``python tests/reliability_table.py`` writes the table from
them (:func:`test_the_docs_table_is_current` keeps it in step). The command line runs as a
user runs it: in a subprocess where that adds something (a real Ctrl-C, the real entry point),
otherwise ``permsparse.cli.main`` in process, with stderr captured at the file descriptor so
that nothing printed by a library below escapes the check.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from permsparse.cli import main
from tiny_llama_folder import embedded_words, one_thread_and_clean_env, save_tiny_llama

SRC = Path(__file__).resolve().parent.parent / "src"
WINDOW = ["--window", "32", "--eval-tokens", "256"]


@dataclass(frozen=True)
class Row:
    """One row of the table: the issue's item, what the user does, what happens, the test."""

    item: int
    case: str
    outcome: str
    test: str


ROWS: list[Row] = []


def case(item: int, what: str, outcome: str) -> Callable:
    """The decorated test checks one row of the table."""

    def deco(fn: Callable) -> Callable:
        ROWS.append(Row(item, what, outcome, fn.__name__))
        return fn

    return deco


def table(item: int, argname: str, rows: list[tuple[str, str, str, Any]]) -> Callable:
    """Parametrise the test over ``(id, case, outcome, value)`` rows, one row of the table each."""

    def deco(fn: Callable) -> Callable:
        for pid, what, outcome, _ in rows:
            ROWS.append(Row(item, what, outcome, f"{fn.__name__}[{pid}]"))
        return pytest.mark.parametrize(argname, [pytest.param(v, id=pid) for pid, _, _, v in rows])(fn)

    return deco


# -- fixtures: one tiny LLaMA folder with a tokenizer, its text, one export with permutations -----


@pytest.fixture(autouse=True)
def _one_thread_and_clean_env():
    yield from one_thread_and_clean_env()


@pytest.fixture(scope="module")
def words() -> list[str]:
    return embedded_words()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, words) -> Path:
    """A tiny LLaMA with a byte-level BPE tokenizer, in a folder of its own (so its parent is ours)."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama") / "model", words[:2000], 300)


@pytest.fixture(scope="module")
def calib(tmp_path_factory, words) -> Path:
    path = tmp_path_factory.mktemp("text") / "calib.txt"
    path.write_text(" ".join(words[2000:5000]), encoding="utf-8")
    return path


def prune_args(model: Path, calib: Path, out: Path, *extra: str) -> list[str]:
    """A fast ``permsparse prune`` (magnitude, no permutation, no evaluation) unless ``extra`` says otherwise."""
    return ["prune", str(model), "--calib", str(calib), "--n-calib", "8", *WINDOW, "--batch-size", "2",
            "--epochs", "1", "--permutation", "none", "--score", "magnitude", "--no-eval", "--out", str(out), "-q",
            *extra]


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory, model_dir, calib) -> Path:
    """A 2:4 export whose every site has a non-identity (heuristic) permutation, with every way of
    paying one: shared sites gathered at the norm, ``o_proj`` and ``down_proj`` folded."""
    out = tmp_path_factory.mktemp("export") / "run"
    assert main(prune_args(model_dir, calib, out, "--permutation", "heuristic", "--score", "wanda",
                           "--groups", "1", "--sync", "--attn-out", "fold")) == 0
    return out


def run_cli(capfd, *args: str) -> tuple[int, str]:
    """``permsparse ARGS`` in process: ``(exit status, stderr)``."""
    rc = main(list(args))
    return rc, capfd.readouterr().err


def one_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert lines[0].startswith("permsparse: ") and "Traceback" not in err
    return lines[0]


def snapshot(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def process(args: list[str], boot: str | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``permsparse ARGS`` in a fresh interpreter running this tree; ``boot``: code run first."""
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1", HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]))
    code = f"{boot or ''}\nimport sys\nfrom permsparse.cli import main\nsys.exit(main({args!r}))\n"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=300)


@pytest.fixture
def no_model_load(monkeypatch):
    """Fails the test if the command reads a model (checks must come first)."""
    import permsparse.models.loading as loading

    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the check")

    monkeypatch.setattr(loading, "load_model", refuse)


# -- 1. --overwrite never deletes what is not a previous run ---------------------------------------


@case(1, "`--out d --overwrite` where `d` holds the user's `notes.txt`",
      "refused, exit 2, the line names `notes.txt`; `d` untouched (the real command, in a subprocess)")
def test_overwrite_spares_a_folder_of_user_files(model_dir, calib, tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    (d / "notes.txt").write_text("x")
    proc = process(prune_args(model_dir, calib, d, "--overwrite"))
    assert proc.returncode == 2, proc.stderr
    line = one_line(proc.stderr)
    assert "notes.txt" in line and "not a permsparse export" in line and "even with --overwrite" in line
    assert snapshot(d) == {"notes.txt": b"x"}


@case(1, "`--out d` without `--overwrite` where `d` holds other files",
      "refused, exit 2; the line says what `d` holds (not \"already holds a run\")")
def test_refusal_says_what_the_folder_holds(model_dir, calib, tmp_path, capfd, no_model_load):
    d = tmp_path / "d"
    (d / "sub").mkdir(parents=True)
    (d / "sub" / "data.csv").write_text("1,2")
    rc, err = run_cli(capfd, *prune_args(model_dir, calib, d))
    line = one_line(err)
    assert rc == 2 and "sub/" in line and "already holds a run" not in line and "--overwrite" not in line
    assert snapshot(d) == {"sub/data.csv": b"1,2"}


@table(1, "target", [
    ("cwd", "`--out . --overwrite` (the current folder)", "refused, exit 2; nothing in it touched", "."),
    ("model", "`--out MODEL --overwrite` (the model's own folder)", "refused, exit 2; the dense model untouched",
     "model"),
    ("parent", "`--out PARENT --overwrite` (a folder that contains the model or the current folder)",
     "refused, exit 2; nothing touched", "parent"),
])
def test_overwrite_never_replaces_the_model_or_the_cwd(model_dir, calib, tmp_path, capfd, monkeypatch, target,
                                                     no_model_load):
    work = tmp_path / "work"
    work.mkdir()
    shutil.copytree(model_dir, work / "model")
    monkeypatch.chdir(work)
    before = snapshot(work)
    out = {".": Path("."), "model": work / "model", "parent": tmp_path}[target]
    rc, err = run_cli(capfd, *prune_args(Path("model"), calib, out, "--overwrite"))
    line = one_line(err)
    assert rc == 2 and "refusing to write there" in line
    assert snapshot(work) == before


@case(1, "a recipe holding `overwrite: true`, `--out` a folder of the user's files",
      "refused as the flag is, exit 2; the files untouched")
def test_recipe_overwrite_follows_the_same_rule(model_dir, calib, tmp_path, capfd, no_model_load):
    d = tmp_path / "d"
    d.mkdir()
    (d / "thesis.tex").write_text("x")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("overwrite: true\npattern: '2:4'\n")
    rc, err = run_cli(capfd, *prune_args(model_dir, calib, d, "--recipe", str(recipe)))
    assert rc == 2 and "thesis.tex" in one_line(err)
    assert snapshot(d) == {"thesis.tex": b"x"}


@case(1, "`--out` a previous run: without, then with `--overwrite`",
      "exit 2 asking for `--overwrite`; then replaced (exit 0), no temporary folder left")
def test_a_previous_run_is_replaced_only_with_overwrite(model_dir, calib, tmp_path, capfd):
    out = tmp_path / "run"
    assert main(prune_args(model_dir, calib, out)) == 0
    listed = json.loads((out / "permsparse.json").read_text())["files"]
    assert "model.safetensors" in listed and "report.md" in listed
    before = snapshot(out)
    rc, err = run_cli(capfd, *prune_args(model_dir, calib, out, "--pattern", "4:8"))
    assert rc == 2 and "previous permsparse export" in one_line(err) and "--overwrite" in err
    assert snapshot(out) == before
    rc, err = run_cli(capfd, *prune_args(model_dir, calib, out, "--pattern", "4:8", "--overwrite"))
    assert rc == 0, err
    assert json.loads((out / "permsparse.json").read_text())["pattern"] == "4:8"
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


@case(1, "`permsparse.export(..., overwrite=True)` into a folder of the user's files (the library)",
      "`ValueError`; the files untouched")
def test_library_export_spares_user_files(export_dir, tmp_path):
    import permsparse
    from permsparse.io.plan import read_plan

    meta, sites, perms = read_plan(export_dir)
    model = permsparse.from_pretrained(export_dir)
    d = tmp_path / "d"
    d.mkdir()
    (d / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match=r"not a permsparse export \(notes\.txt\)"):
        permsparse.export(model, d, sites, perms, pattern="2:4", score="wanda", groups=meta["groups"],
                          overwrite=True)
    assert snapshot(d) == {"notes.txt": b"x"}


# -- 2. --checkpoint never overwrites what is not this run's -----------------------------------------


def _fake_checkpoint(path: Path, **meta: Any) -> Path:
    from permsparse.train.checkpoint import save_checkpoint

    return save_checkpoint(path, {"param/x": torch.zeros(2)}, {"key": "k", "step": 3, "steps": 8, **meta})


@table(2, "kind", [
    ("text", "`--checkpoint notes.txt` (an existing file that is not a checkpoint), with or without `--resume`",
     "refused, exit 2, before any model is read; the file untouched", "text"),
    ("folder", "`--checkpoint DIR` (a folder)", "refused, exit 2, one line", "folder"),
    ("other-run", "`--checkpoint` another run's checkpoint, `--resume` forgotten or given",
     "refused, exit 2, naming its step; the checkpoint untouched", "other-run"),
    ("truncated", "`--checkpoint` a truncated checkpoint with `--resume`", "refused, exit 2, one line", "truncated"),
    ("inside-out", "`--checkpoint` inside `--out` (which the export replaces)", "refused, exit 2", "inside-out"),
    ("unwritable", "`--checkpoint` where nothing can be written", "refused, exit 2, before any model is read",
     "unwritable"),
])
def test_checkpoint_that_is_not_this_runs(model_dir, calib, tmp_path, capfd, no_model_load, kind):
    ck = tmp_path / "ck.safetensors"
    out = tmp_path / "run"
    if kind == "text":
        ck = tmp_path / "notes.txt"
        ck.write_text("my notes")
    elif kind == "folder":
        ck.mkdir()
    elif kind == "other-run":
        _fake_checkpoint(ck, cli_run="another run")
    elif kind == "truncated":
        _fake_checkpoint(ck)
        ck.write_bytes(ck.read_bytes()[:40])
    elif kind == "inside-out":
        ck = out / "ck.safetensors"
    else:
        if not Path("/proc/self").exists():
            pytest.skip("needs /proc, a mount nothing can be created in")
        ck = Path("/proc/permsparse-test/ck.safetensors")
    before = ck.read_bytes() if ck.is_file() else None
    needles = {"text": "not a permsparse training checkpoint", "folder": "is a folder",
               "other-run": "step 3 of 8", "truncated": "truncated", "inside-out": "inside --out",
               "unwritable": "cannot be written"}
    for resume in ([], ["--resume"]):
        rc, err = run_cli(capfd, *prune_args(model_dir, calib, out, "--permutation", "learned", "--checkpoint",
                                             str(ck), *resume))
        assert rc == 2 and needles[kind] in one_line(err), err
        assert before is None or ck.read_bytes() == before
    assert not out.exists()


@case(2, "`--checkpoint` this very run's checkpoint (same model, data and settings)",
      "`--resume` continues it; without `--resume` the run starts over, with a warning")
def test_this_runs_checkpoint_is_accepted(model_dir, calib, tmp_path, caplog):
    from permsparse.cli import UsageError, build_parser
    from permsparse.cli.prune import run_configs

    ck, out = tmp_path / "ck.safetensors", tmp_path / "run"
    args = prune_args(model_dir, calib, out, "--permutation", "learned", "--checkpoint", str(ck))
    identity = run_configs(build_parser().parse_args(args)).identity
    _fake_checkpoint(ck, cli_run=identity)
    assert run_configs(build_parser().parse_args(args + ["--resume"])).identity == identity
    with caplog.at_level("WARNING", logger="permsparse"):
        run_configs(build_parser().parse_args(args))
    assert "starts over" in caplog.text
    # Another calibration text is another run.
    other = tmp_path / "other.txt"
    other.write_text(calib.read_text()[:-10])
    with pytest.raises(UsageError, match="different run"):
        run_configs(build_parser().parse_args(args[:2] + ["--calib", str(other)] + args[4:] + ["--resume"]))


# -- 3. a plan that does not fit its model is refused on load ----------------------------------------


def _edit_plan(src: Path, dst: Path, fn: Callable[[dict], None]) -> Path:
    shutil.copytree(src, dst)
    data = json.loads((dst / "permsparse.json").read_text())
    fn({s["name"]: s for s in data["sites"]})
    (dst / "permsparse.json").write_text(json.dumps(data))
    return dst


TAMPER_FITS = {
    "norm": lambda s: s["model.layers.0.attn_in"].__setitem__("norm", "model.layers.0.post_attention_layernorm"),
    "consumer": lambda s: s["model.layers.0.attn_in"]["consumers"].pop(),
    "producer": lambda s: s["model.layers.1.mlp_out"]["producers"].pop(),
}


@table(3, "edit", [
    ("norm", "`permsparse.json`: a site's `norm` changed to another norm of the same width; `permsparse eval`",
     "refused, exit 2: the plan does not fit (deployed and stock outputs differ); `load(deploy=False)` refuses it "
     "too", "norm"),
    ("consumer", "`permsparse.json`: a consumer dropped from a site; `permsparse eval`", "refused, exit 2 (and by "
     "`load(deploy=False)`)", "consumer"),
    ("producer", "`permsparse.json`: a producer dropped from a fold; `permsparse eval`", "refused, exit 2 (and by "
     "`load(deploy=False)`)", "producer"),
])
def test_a_plan_that_does_not_fit_is_refused(export_dir, calib, tmp_path, capfd, edit):
    from permsparse.io.export import load
    from permsparse.io.verify import PlanMismatchError

    bad = _edit_plan(export_dir, tmp_path / "bad", TAMPER_FITS[edit])
    rc, err = run_cli(capfd, "eval", str(bad), "--data", str(calib), *WINDOW, "-q")
    assert rc == 2 and "does not fit this model" in one_line(err)
    with pytest.raises(PlanMismatchError):
        load(bad, deploy=False)


@case(3, "`from_pretrained(DIR)` (stock coordinates) of an untouched export",
      "the plan is deployed, compared and undone: the model equals the stock load bit for bit")
def test_the_check_leaves_the_stock_model_exact(export_dir):
    import transformers

    import permsparse

    stock = transformers.AutoModelForCausalLM.from_pretrained(export_dir)
    model = permsparse.from_pretrained(export_dir, dtype=torch.float32)
    a, b = stock.state_dict(), model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [type(m) for m in stock.modules()] == [type(m) for m in model.modules()]
    assert all(p.requires_grad == q.requires_grad for p, q in zip(stock.parameters(), model.parameters()))


# -- 5, 9. meaningless or impossible settings ----------------------------------------------------------


@table(5, "flags", [
    ("guard-batches", "`--guard-batches 0`", "refused, exit 2, naming `--guard-batches`", ["--guard-batches", "0"]),
    ("n-calib", "`--n-calib 0` (Wanda needs activations; learned permutations too)",
     "refused, exit 2, naming `--n-calib`", ["--n-calib", "0", "--score", "wanda", "--permutation", "learned"]),
    ("alpha", "`--alpha -1`", "refused, exit 2", ["--alpha", "-1"]),
    ("time-budget", "`--time-budget -5`", "refused, exit 2", ["--time-budget", "-5"]),
    ("steps-per-block", "`--steps-per-block 0`", "refused, exit 2", ["--steps-per-block", "0"]),
    ("sinkhorn-iters", "`--sinkhorn-iters 0` (item 9: was an UnboundLocalError)", "refused, exit 2",
     ["--sinkhorn-iters", "0"]),
    ("lr", "`--lr nan`", "refused, exit 2", ["--lr", "nan"]),
    ("epochs", "`--epochs inf`", "refused, exit 2", ["--epochs", "inf"]),
    ("window", "`--window 1` (no next token to predict)", "refused, exit 2", ["--window", "1"]),
    ("device", "`--device nonsense` (item 9)", "refused, exit 2, naming `--device`", ["--device", "nonsense"]),
])
def test_a_meaningless_setting_is_refused(model_dir, calib, tmp_path, capfd, no_model_load, flags):
    out = tmp_path / "run"
    rc, err = run_cli(capfd, *prune_args(model_dir, calib, out, *flags))
    line = one_line(err)
    assert rc == 2 and flags[0] in line, line
    assert not out.exists()


@case(9, "`--offload --device cuda` on a machine without CUDA",
      "refused, exit 2, before any model is read (was an AssertionError)")
def test_cuda_device_without_cuda(model_dir, calib, tmp_path, capfd, no_model_load, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on this CPU-only machine
    rc, err = run_cli(capfd, *prune_args(model_dir, calib, tmp_path / "run", "--offload", "--device", "cuda"))
    assert rc == 2 and "CUDA is not available" in one_line(err)


# -- 7. one line and the right exit status for every OSError and corrupt file ------------------------


def _broken_model(model_dir: Path, tmp_path: Path, how: str) -> Path:
    dst = tmp_path / f"model-{how}"
    shutil.copytree(model_dir, dst)
    if how == "config":
        (dst / "config.json").write_text('{"model_type": "llama", "hidden_size": ')
    elif how == "truncated":
        data = (dst / "model.safetensors").read_bytes()
        (dst / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif how == "shapes":
        config = json.loads((dst / "config.json").read_text())
        (dst / "config.json").write_text(json.dumps({**config, "intermediate_size": 256}))
    elif how == "nan":
        from safetensors.torch import load_file, save_file

        tensors = load_file(dst / "model.safetensors")
        tensors["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
        save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    elif how == "no-tokenizer":
        for f in dst.glob("tokenizer*"):
            f.unlink()
    return dst


@table(7, "how", [
    ("config", "a corrupt `config.json` (`prune` and `eval`)", "exit 2, one line naming `config.json`", "config"),
    ("truncated", "a truncated `model.safetensors` (`prune` and `eval`)", "exit 2, one line naming the file",
     "truncated"),
    ("shapes", "`config.json` of other widths than the weights", "exit 2, one line (no load report) naming a tensor",
     "shapes"),
])
def test_a_broken_model_folder_is_one_line(model_dir, export_dir, calib, tmp_path, capfd, how):
    needles = {"config": "config.json is not valid JSON", "truncated": "model.safetensors is truncated",
               "shapes": "do not match config.json"}
    broken = _broken_model(model_dir, tmp_path, how)
    rc, err = run_cli(capfd, *prune_args(broken, calib, tmp_path / "run"))
    assert rc == 2 and needles[how] in one_line(err), err
    if how != "shapes":  # eval: the same on an export
        broken_export = tmp_path / f"export-{how}"
        shutil.copytree(export_dir, broken_export)
        shutil.copyfile(broken / ("config.json" if how == "config" else "model.safetensors"),
                        broken_export / ("config.json" if how == "config" else "model.safetensors"))
        rc, err = run_cli(capfd, "eval", str(broken_export), "--data", str(calib), *WINDOW, "-q")
        assert rc == 2 and needles[how] in one_line(err), err


@case(7, "a mistyped alias (`smollm2-135`)",
      "exit 2 at once, one line: `did you mean smollm2-135m?` (no Hub round trip, no traceback)")
def test_a_mistyped_alias(calib, tmp_path, capfd, no_model_load):
    rc, err = run_cli(capfd, *prune_args(Path("smollm2-135"), calib, tmp_path / "run"))
    assert rc == 2 and "did you mean smollm2-135m?" in one_line(err)


@case(7, "`--out` on a location that cannot be written (a read-only mount)",
      "exit 2 before any model is read, one line")
@pytest.mark.skipif(not Path("/proc/self").exists(), reason="needs /proc, a mount nothing can be created in")
def test_an_unwritable_out_fails_before_the_run(model_dir, calib, capfd, no_model_load):
    rc, err = run_cli(capfd, *prune_args(model_dir, calib, Path("/proc/permsparse-test/run")))
    assert rc == 2 and "cannot be written" in one_line(err)


@case(7, "an OSError at run time (the disk fills up while the export is written)",
      "exit 1, one line `No space left on device: PATH`, no traceback")
def test_an_oserror_at_run_time(model_dir, calib, tmp_path, capfd, monkeypatch):
    import errno

    from permsparse.api import PruneResult

    def full(self, out, *a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(out))

    monkeypatch.setattr(PruneResult, "save_pretrained", full)
    out = tmp_path / "run"
    rc, err = run_cli(capfd, *prune_args(model_dir, calib, out))
    assert rc == 1 and one_line(err) == f"permsparse: error: {os.strerror(errno.ENOSPC)}: {out}"


@case(12, "a resumed run's exported `steps.jsonl`",
      "holds every step (the checkpoint's history too), not only those after the resume")
@case(7, "Ctrl-C during training with `--checkpoint` (a real SIGINT to the real command)",
      "exit 130, no traceback; one line with the command to continue (`--resume`), which then finishes")
def test_ctrl_c_says_how_to_resume(model_dir, calib, tmp_path):
    ck, out = tmp_path / "ck.safetensors", tmp_path / "run"
    boot = "\n".join([
        "import os, signal",
        # A shell's background job starts with SIGINT ignored, and Python then installs no
        # KeyboardInterrupt handler: restore it so that the test behaves the same everywhere.
        "signal.signal(signal.SIGINT, signal.default_int_handler)",
        "import permsparse.train.checkpoint as C",
        "real, saved = C.save_checkpoint, []",
        "def save(*a, **k):",
        "    real(*a, **k)",
        "    saved.append(1)",
        "    if len(saved) == 2:",
        "        os.kill(os.getpid(), signal.SIGINT)",
        "C.save_checkpoint = save",
    ])
    args = prune_args(model_dir, calib, out, "--permutation", "learned", "--score", "wanda", "--checkpoint", str(ck),
                      "--checkpoint-every", "1")
    proc = process(args, boot=boot)
    assert proc.returncode == 130, proc.stderr
    line = one_line(proc.stderr)
    assert "(step 2 of 4)" in line and line.endswith("--resume")
    assert not out.exists()
    again = shlex.split(line.split("to continue, run: ", 1)[1])
    assert again[0] == "permsparse" and again[1:-1] == args
    assert main(again[1:]) == 0
    # 12: the export's steps.jsonl holds every step, those before the interruption too.
    steps = [json.loads(ln)["step"] for ln in (out / "steps.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 3]




# -- 8. tampered plan fields: one line naming the field, deployed or not -------------------------------


TAMPER_FIELDS = [
    ("head_dim-0", "`head_dim: 0`", "head_dim", lambda s: s["model.layers.0.attn_out"].__setitem__("head_dim", 0)),
    ("head_dim-str", "`head_dim: \"16\"` (a string)", "head_dim",
     lambda s: s["model.layers.0.attn_out"].__setitem__("head_dim", "16")),
    ("head_dim-wrong", "`head_dim: 8` (a wrong value)", "kv_of_head",
     lambda s: s["model.layers.0.attn_out"].__setitem__("head_dim", 8)),
    ("kv_of_head", "`kv_of_head` out of range", "kv_of_head",
     lambda s: s["model.layers.0.attn_out"].__setitem__("kv_of_head", [0, 0, 5, 5])),
    ("row_offset", "a negative `row_offset`", "row offset",
     lambda s: s["model.layers.0.mlp_out"]["producers"][0].__setitem__(1, -4)),
    ("row_offset-past", "a `row_offset` past the producer's rows", "output rows",
     lambda s: s["model.layers.0.mlp_out"]["producers"][0].__setitem__(1, 100)),
    ("d_in", "`d_in: \"64\"`", "d_in", lambda s: s["model.layers.0.attn_in"].__setitem__("d_in", "64")),
    ("consumers", "`consumers` not a list", "consumers",
     lambda s: s["model.layers.0.attn_in"].__setitem__("consumers", "model.layers.0.self_attn.q_proj")),
    ("payment", "an unknown `payment`", "payment", lambda s: s["model.layers.0.attn_in"].__setitem__("payment", "x")),
    ("norm", "`norm: 3`", "norm", lambda s: s["model.layers.0.attn_in"].__setitem__("norm", 3)),
]


@table(8, "tamper", [(pid, what + ", `load(deploy=True)` and `deploy=False`",
                      f"`ValueError` naming the site and `{needle}`", (needle, fn))
                     for pid, what, needle, fn in TAMPER_FIELDS])
def test_a_tampered_field_is_named(export_dir, tmp_path, tamper):
    from permsparse.io.export import load

    needle, fn = tamper
    bad = _edit_plan(export_dir, tmp_path / "bad", fn)
    for deploy in (True, False):
        with pytest.raises(ValueError, match=r"site model\.layers\.0\.\w+") as info:
            load(bad, deploy=deploy)
        assert needle in str(info.value) and "permsparse.json" in str(info.value)


# -- 11. clear messages -------------------------------------------------------------------------------


@case(11, "a YAML recipe with `pattern: 2:4` unquoted (YAML 1.1 reads 124)",
      "read as \"2:4\"; a pattern given as a number says to quote it")
def test_yaml_pattern_unquoted(tmp_path):
    from permsparse.cli import UsageError
    from permsparse.cli.recipe import load_recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text("pattern: 2:4\nn_calib: 16\n")
    assert load_recipe(recipe) == {"pattern": "2:4", "n_calib": 16}
    recipe.write_text("pattern: 124\n")
    with pytest.raises(UsageError, match="quote it"):
        load_recipe(recipe)


@table(11, "how", [
    ("latin1", "a non-UTF-8 `--calib` file", "exit 2, the line names the file and the byte", "latin1"),
    ("nan", "a weight that holds NaN", "exit 2, the line names the layer (`model.layers.1.mlp.up_proj.weight`)",
     "nan"),
    ("no-tokenizer", "a model folder without a tokenizer", "exit 2, our one line (not transformers' text)",
     "no-tokenizer"),
    ("pattern", "`--pattern 2:5` on layers 64 wide", "exit 2: width 64 is no multiple of 5 whatever the groups; "
     "the M that fit are listed", "pattern"),
])
def test_a_clear_message(model_dir, calib, tmp_path, capfd, how):
    model, text, extra = model_dir, calib, []
    if how == "latin1":
        text = tmp_path / "latin1.txt"
        text.write_bytes(("caf\xe9 au lait " * 400).encode("latin-1"))
    elif how == "pattern":
        extra = ["--pattern", "2:5"]
    else:
        model = _broken_model(model_dir, tmp_path, how)
    rc, err = run_cli(capfd, *prune_args(model, text, tmp_path / "run", *extra))
    line = one_line(err)
    needle = {"latin1": f"{text} is not UTF-8 (byte 0xe9", "nan": "model.layers.1.mlp.up_proj.weight holds 1 NaN",
              "no-tokenizer": "has no usable tokenizer", "pattern": "input width 64 is not a multiple of M=5"}[how]
    assert rc == 2 and needle in line, line
    if how == "pattern":
        assert "M = 2, 4, 8, 16, 32" in line and "choose groups" not in line


# -- 12. a killed export's leftovers ---------------------------------------------------------------------


@case(12, "a killed export left `.run.tmp-*` folders beside `--out run`",
      "the next run writing to `run` removes those of processes that are gone; a live one's and the user's "
      "look-alikes stay")
def test_leftovers_of_a_killed_export_are_removed(model_dir, calib, tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale = [tmp_path / ".run.tmp-abcd_123", tmp_path / f".run.tmp-{dead}.x1y2z3w4"]
    kept = [tmp_path / f".run.tmp-{os.getpid()}.live0000", tmp_path / ".run.tmp-notes",
            tmp_path / ".other.tmp-abcd1234"]
    for d in stale + kept:
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"0" * 1000)
    assert main(prune_args(model_dir, calib, tmp_path / "run")) == 0
    assert not any(d.exists() for d in stale)
    assert all(d.exists() for d in kept)


# -- the table in docs/reliability.md is generated from the cases above --------------------------------


def test_the_docs_table_is_current():
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from reliability_table import DOC, render

    assert DOC.read_text(encoding="utf-8") == render(ROWS), "run: python tests/reliability_table.py"
