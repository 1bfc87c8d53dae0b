"""The ``permsparse`` command line, end to end on a tiny LLaMA folder built offline.

The model folder is a stock Hugging Face folder (``config.json`` + safetensors + a fast
tokenizer trained here on the embedded Wikipedia text); the calibration text is real
Wikipedia text in a local ``.txt`` file. Most tests run ``permsparse.cli.main`` in
process, so exit codes, stdout and stderr are checked directly; the exit-code tests run
the command in a subprocess.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

import permsparse
from permsparse.cli import main
from permsparse.io.plan import PLAN_FILE, read_plan
from tiny_llama_folder import embedded_words, one_thread_and_clean_env, save_tiny_llama

WINDOW = ["--window", "32", "--eval-tokens", "256"]
TRAINER_KNOBS = ("--lr", "--tau-start", "--tau-end", "--sinkhorn-iters", "--alpha", "--groups", "--objective",
                 "--init", "--epochs", "--batch-size", "--margin", "--tau-schedule", "--steps-per-block",
                 "--no-bf16", "--seed", "--heuristic-power", "--sync", "--snapshots", "--average", "--tail-average",
                 "--teacher-cache-gb", "--lr-end")


@pytest.fixture(autouse=True)
def _one_thread_and_clean_env():
    yield from one_thread_and_clean_env()


@pytest.fixture(scope="module")
def words() -> list[str]:
    return embedded_words()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, words) -> Path:
    """A tiny LLaMA with a BPE tokenizer trained on a few thousand words of the embedded Wikipedia text."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama"), words[:5000], 512)


@pytest.fixture(scope="module")
def calib_txt(tmp_path_factory, words) -> Path:
    """Real Wikipedia text (other words than the tokenizer saw), a few thousand tokens."""
    path = tmp_path_factory.mktemp("text") / "calib.txt"
    path.write_text(" ".join(words[5000:8000]), encoding="utf-8")
    return path


def _prune(model_dir, calib_txt, out, *extra) -> list[str]:
    return ["prune", str(model_dir), "--calib", str(calib_txt), "--n-calib", "8", *WINDOW, "--batch-size", "2",
            "--epochs", "1", "--out", str(out), "-q", *extra]


def _one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert lines[0].startswith("permsparse: error: ")
    return lines[0]


def _snapshot(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _no_leftovers(parent: Path, name: str) -> None:
    stray = [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.")]
    assert not stray, f"temporary folders left behind: {stray}"


# -- end to end ------------------------------------------------------------------------------


def test_prune_learned_then_eval(model_dir, calib_txt, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(_prune(model_dir, calib_txt, out, "--pattern", "2:4", "--permutation", "learned", "--objective", "e2e"))
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "report.md" in captured.out

    names = {p.name for p in out.iterdir()}
    for required in (PLAN_FILE, "config.json", "tokenizer.json", "report.md", "training.png", "retained.png",
                     "steps.jsonl"):
        assert required in names, f"{required} missing from {sorted(names)}"
    assert any(n.endswith(".safetensors") for n in names)
    _no_leftovers(tmp_path, "run")

    meta, sites, perms = read_plan(out)  # validates the plan
    assert meta["pattern"] == "2:4" and meta["score"] == "wanda"
    # The default: one site per layer (7 per LLaMA block); --sync shares one per input (4).
    assert len(sites) == 14 and set(perms) == {s.name for s in sites}
    metrics = meta["metrics"]
    guard = metrics["guard"]
    # The three plans, the snapshots of the run (4 steps: taken at steps 1 and 2; the one at
    # step 3 is the last plan itself), the plan of the averaged costs and that of the costs
    # averaged over the second half of the run.
    # Then (reconstruction, the default) the finalists refitted: the learned plan and the
    # heuristic, and no permutation where it beat the heuristic under the plain mask.
    finalists = {"learned", "heuristic"} | ({"none"} if guard["none"] < guard["heuristic"] else set())
    assert set(guard) == {"none", "heuristic", "learned", "learned@1", "learned@2", "learned@avg0.8", "learned@avg0.9",
                          "learned@tail0.5"} | {f"{k}+refit" for k in finalists}
    kept = min(finalists, key=lambda k: (guard[f"{k}+refit"], k != "learned"))
    assert metrics["kept_plan"] == kept
    assert math.isfinite(metrics["ppl"]) and math.isfinite(metrics["ppl_dense"])
    assert meta["config"]["permutation"] == "learned"

    # One record per training step: 8 windows / batch 2 = 4 steps for one epoch.
    records = [json.loads(ln) for ln in (out / "steps.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2, 3]
    for r in records:
        for key in ("loss", "ce", "kl", "tau", "entropy", "changed"):
            assert math.isfinite(r[key]), (key, r)
    assert records[-1]["tau"] < records[0]["tau"]

    report = (out / "report.md").read_text()
    assert "The guard kept" in report and "training.png" in report and "retained.png" in report
    for png in ("training.png", "retained.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    rc = main(["eval", str(out), "--data", str(calib_txt), *WINDOW, "--json", "-q"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    result = json.loads(captured.out)
    assert math.isfinite(result["ppl"]) and result["ppl"] > 1
    # The deployed model evaluates like the exported one (same text, same windows).
    assert result["ppl"] == pytest.approx(metrics["ppl"], rel=1e-3)


@pytest.mark.parametrize(
    "pattern, permutation, score",
    [("2:4", "heuristic", "wanda"), ("2:4", "none", "wanda"), ("4:8", "heuristic", "wanda"),
     ("2:4", "none", "magnitude")],
)
def test_prune_variants(model_dir, calib_txt, tmp_path, capsys, pattern, permutation, score):
    out = tmp_path / "run"
    rc = main(_prune(model_dir, calib_txt, out, "--pattern", pattern, "--permutation", permutation,
                     "--score", score, "--no-eval"))
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    meta, sites, perms = read_plan(out)
    assert meta["pattern"] == pattern and meta["score"] == score
    assert meta["config"]["permutation"] == permutation
    assert meta["metrics"]["kept_plan"] == permutation
    assert (out / "report.md").is_file() and (out / "retained.png").is_file()
    assert not (out / "steps.jsonl").exists() and not (out / "training.png").exists()  # nothing was trained
    if permutation == "none":
        assert all(p.is_identity() for p in perms.values())
    # The export is a stock folder: transformers loads it as it is.
    from transformers import AutoModelForCausalLM

    stock = AutoModelForCausalLM.from_pretrained(out)
    w = stock.model.layers[0].mlp.down_proj.weight
    assert (w == 0).float().mean().item() >= 0.5 - 1e-6


def test_existing_empty_out_is_used(model_dir, calib_txt, tmp_path, capsys):
    out = tmp_path / "empty"
    out.mkdir()
    rc = main(_prune(model_dir, calib_txt, out, "--permutation", "none", "--score", "magnitude", "--no-eval"))
    assert rc == 0, capsys.readouterr().err
    assert (out / PLAN_FILE).is_file()


# -- recipes ---------------------------------------------------------------------------------


def test_yaml_recipe_and_flag_override(model_dir, calib_txt, tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text('pattern: "4:8"\npermutation: heuristic\nscore: magnitude\nn-calib: 4\nno_eval: true\n')
    out = tmp_path / "a"
    rc = main(_prune(model_dir, calib_txt, out, "--recipe", str(recipe)))
    assert rc == 0, capsys.readouterr().err
    meta, _, _ = read_plan(out)
    assert (meta["pattern"], meta["score"], meta["config"]["permutation"]) == ("4:8", "magnitude", "heuristic")
    assert "ppl" not in meta["metrics"]

    out = tmp_path / "b"  # a flag given on the command line wins over the recipe
    rc = main(_prune(model_dir, calib_txt, out, "--recipe", str(recipe), "--permutation", "none"))
    assert rc == 0, capsys.readouterr().err
    meta, _, perms = read_plan(out)
    assert meta["pattern"] == "4:8" and meta["config"]["permutation"] == "none"
    assert all(p.is_identity() for p in perms.values())


def test_json_recipe(model_dir, calib_txt, tmp_path, capsys):
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"pattern": "4:8", "permutation": "heuristic", "groups": 2, "no-eval": True}))
    out = tmp_path / "run"
    rc = main(_prune(model_dir, calib_txt, out, "--recipe", str(recipe)))
    assert rc == 0, capsys.readouterr().err
    meta, _, _ = read_plan(out)
    assert meta["pattern"] == "4:8" and meta["groups"] == 2 and meta["config"]["permutation"] == "heuristic"


@pytest.mark.parametrize(
    "name, text, needle",
    [("recipe.yaml", "pattern: '2:4'\nlearning_rate: 0.1\n", "learning_rate"),
     ("recipe.json", '{"pattern": "2:4", "bogus-key": 1}', "bogus_key"),
     ("recipe.yaml", "pattern: [unclosed\n", "cannot parse"),
     ("recipe.yaml", "- just\n- a list\n", "mapping"),
     ("recipe.yaml", "permutation: sometimes\n", "sometimes")],
)
def test_bad_recipe_exits_2(model_dir, calib_txt, tmp_path, capsys, name, text, needle):
    recipe = tmp_path / name
    recipe.write_text(text)
    out = tmp_path / "run"
    rc = main(_prune(model_dir, calib_txt, out, "--recipe", str(recipe)))
    assert rc == 2
    line = _one_error_line(capsys.readouterr().err)
    assert needle in line
    assert not out.exists()


def test_missing_recipe_file_exits_2(model_dir, calib_txt, tmp_path, capsys):
    rc = main(_prune(model_dir, calib_txt, tmp_path / "run", "--recipe", str(tmp_path / "nope.yaml")))
    assert rc == 2
    assert "not found" in _one_error_line(capsys.readouterr().err)


# -- bad input: exit 2, one line, nothing written --------------------------------------------


def test_missing_model_path(calib_txt, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(_prune(tmp_path / "no" / "such" / "model", calib_txt, out))
    assert rc == 2
    assert "not found" in _one_error_line(capsys.readouterr().err)
    assert not out.exists()


def test_folder_without_model(calib_txt, tmp_path, capsys):
    folder = tmp_path / "not_a_model"
    folder.mkdir()
    (folder / "notes.txt").write_text("hello")
    out = tmp_path / "run"
    rc = main(_prune(folder, calib_txt, out))
    assert rc == 2
    assert "no model" in _one_error_line(capsys.readouterr().err)
    assert not out.exists()


@pytest.mark.parametrize("text", ["", "Only a handful of words here."], ids=["empty", "short"])
def test_data_too_short(model_dir, tmp_path, capsys, text):
    data = tmp_path / "short.txt"
    data.write_text(text)
    out = tmp_path / "run"
    rc = main(_prune(model_dir, data, out))
    assert rc == 2
    assert "fewer than one window" in _one_error_line(capsys.readouterr().err)
    assert not out.exists()
    _no_leftovers(tmp_path, "run")


def test_missing_data_file(model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(_prune(model_dir, tmp_path / "missing.txt", out))
    assert rc == 2
    assert "not found" in _one_error_line(capsys.readouterr().err)
    assert not out.exists()


def test_occupied_out_needs_overwrite(model_dir, calib_txt, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    # An export of a version that did not list its files yet: its known names count as a run's.
    (out / PLAN_FILE).write_text('{"format_version": 1, "pattern": "2:4", "sites": []}')
    (out / "model.safetensors").write_bytes(b"old weights")
    before = _snapshot(out)

    rc = main(_prune(model_dir, calib_txt, out, "--permutation", "none", "--score", "magnitude", "--no-eval"))
    assert rc == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "--overwrite" in line
    assert _snapshot(out) == before  # untouched

    rc = main(_prune(model_dir, calib_txt, out, "--permutation", "none", "--score", "magnitude", "--no-eval",
                     "--overwrite"))
    assert rc == 0, capsys.readouterr().err
    meta, _, _ = read_plan(out)  # the new run replaced the old one
    assert meta["pattern"] == "2:4"
    assert (out / "model.safetensors").read_bytes() != b"old weights"
    _no_leftovers(tmp_path, "run")


def test_out_is_a_file(model_dir, calib_txt, tmp_path, capsys):
    out = tmp_path / "file"
    out.write_text("x")
    rc = main(_prune(model_dir, calib_txt, out))
    assert rc == 2
    assert "not a directory" in _one_error_line(capsys.readouterr().err)
    assert out.read_text() == "x"


@pytest.mark.parametrize("pattern", ["4:2", "3:4x", "0:4"])
def test_invalid_pattern(model_dir, calib_txt, tmp_path, capsys, pattern):
    out = tmp_path / "run"
    rc = main(_prune(model_dir, calib_txt, out, "--pattern", pattern))
    assert rc == 2
    _one_error_line(capsys.readouterr().err)
    assert not out.exists()


def test_out_required(model_dir, calib_txt, capsys):
    rc = main(["prune", str(model_dir), "--calib", str(calib_txt)])
    assert rc == 2
    assert "--out" in _one_error_line(capsys.readouterr().err)


def test_eval_missing_dir(tmp_path, capsys):
    rc = main(["eval", str(tmp_path / "nothing"), "--json"])
    assert rc == 2
    assert "not a directory" in _one_error_line(capsys.readouterr().err)


# -- help ----------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["prune", "eval", "demo"])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert f"permsparse {command}" in text
    if command == "prune":
        for knob in TRAINER_KNOBS:
            assert knob in text, f"{knob} missing from prune --help"


def test_top_level_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for command in ("prune", "eval", "demo"):
        assert command in text


def test_quiet_before_or_after_command(model_dir, calib_txt, tmp_path, capsys):
    """``-q`` works before the command and after it."""
    out = tmp_path / "run"
    args = _prune(model_dir, calib_txt, out, "--permutation", "none", "--score", "magnitude", "--no-eval")
    args.remove("-q")
    rc = main(["-q", *args])
    assert rc == 0
    assert capsys.readouterr().err.strip() == ""


# -- a diverging run -------------------------------------------------------------------------


def test_nan_loss_exits_1_and_writes_nothing(model_dir, calib_txt, tmp_path, capsys, monkeypatch):
    import permsparse.train.loop as learn

    real = learn.task_loss
    calls = {"n": 0}

    def nan_after_first(logits, batch, teacher, alpha):
        calls["n"] += 1
        loss, ce, kl = real(logits, batch, teacher, alpha)
        if calls["n"] > 1:
            loss = loss * float("nan")
        return loss, ce, kl

    monkeypatch.setattr(learn, "task_loss", nan_after_first)
    out = tmp_path / "run"
    rc = main(_prune(model_dir, calib_txt, out, "--permutation", "learned", "--objective", "e2e"))
    assert rc == 1  # a failure at run time, not a usage error
    line = _one_error_line(capsys.readouterr().err)
    assert "loss became nan" in line and "--lr" in line
    assert calls["n"] == 2
    assert not out.exists()
    _no_leftovers(tmp_path, "run")
    assert os.listdir(tmp_path) == []


# -- options generated from the config dataclasses ------------------------------------------------


def _configs(*flags: str, recipe: dict | None = None, task: str = "causal-lm"):
    from permsparse.cli import build_parser
    from permsparse.cli.options import given_values, resolve

    args = build_parser().parse_args(["prune", "m", "--out", "o", *flags])
    return resolve(task, recipe or {}, given_values(args))


def test_trainer_knobs_reach_the_config():
    from permsparse.cli import UsageError
    from permsparse.config import LearnConfig

    learn = _configs("--average", "0.5,0.7", "--teacher-cache-gb", "0", "--snapshots", "1", "--lr-end", "0.002")[0].learn
    assert (learn.average, learn.teacher_cache_gb, learn.snapshots, learn.lr_end) == ((0.5, 0.7), 0.0, 1, 0.002)
    assert _configs("--average", "0")[0].learn.average == ()
    assert _configs("--lr-end", "0")[0].learn.lr_end is None
    default = _configs()[0].learn
    assert (default.average, default.teacher_cache_gb, default.lr_end) == ((0.8, 0.9), 8.0, LearnConfig.lr_end)
    assert default.tail_average == LearnConfig.tail_average == 0.5
    for flag, want in (("0.25", 0.25), ("0", 0.0), ("off", None)):
        assert _configs("--tail-average", flag)[0].learn.tail_average == want
    with pytest.raises(ValueError, match="tail_average"):
        _configs("--tail-average", "1.5")
    with pytest.raises(UsageError, match="--score"):
        _configs("--score", "best")
    cfg, data, run = _configs("--sync", "--no-bf16", "--checkpoint", "c.st", "--groups", "auto", "--no-eval",
                              "--n-calib", "7", "--resume", "--no-reconstruct", "--time-budget", "0")
    assert (cfg.sync, cfg.learn.bf16, cfg.learn.checkpoint_path, cfg.groups) == (True, False, "c.st", "auto")
    assert (cfg.reconstruct, cfg.learn.time_budget) == (False, None)
    assert (_configs()[0].sync, _configs()[0].reconstruct) == (False, True)
    assert _configs("--sync", "--independent")[0].sync is False  # the flag of earlier releases still parses
    assert (data.n_calib, run.no_eval, run.resume, run.out) == (7, True, True, "o")


def test_defaults_of_what_is_pruned():
    """Image classifiers calibrate on more images in larger batches; on the digits, with the
    settings chosen on their validation split. A recipe and the flags still win."""
    from permsparse.config import DIGITS_PRUNE

    cfg, data, _ = _configs()
    assert (data.calib, data.n_calib, cfg.learn.batch_size, cfg.groups) == ("wikipedia", 128, 4, 4)
    cfg, data, _ = _configs(task="image-classification")
    assert (data.calib, data.n_calib, cfg.learn.batch_size) == ("digits", DIGITS_PRUNE["n_calib"],
                                                                  DIGITS_PRUNE["batch_size"])
    assert (cfg.learn.epochs, cfg.groups) == (DIGITS_PRUNE["epochs"], DIGITS_PRUNE["groups"])
    cfg, data, _ = _configs("--calib", "imgs", task="image-classification")
    assert (data.n_calib, cfg.learn.batch_size, cfg.groups) == (512, 32, 4)
    cfg, data, _ = _configs("--batch-size", "8", recipe={"n_calib": 16}, task="image-classification")
    assert (data.n_calib, cfg.learn.batch_size) == (16, 8)


def _config_options():
    from permsparse.cli.options import SECTIONS, help_text, options

    opts = options()
    for _, cls, _ in SECTIONS:
        for f in fields(cls):
            if f.name in opts and opts[f.name].flag:
                yield cls, f, opts[f.name], help_text(opts[f.name])


def test_every_config_field_is_an_option_with_its_default(capsys, monkeypatch):
    from permsparse.config import LearnConfig, PruneConfig

    monkeypatch.setenv("COLUMNS", "1000")  # one line per option
    with pytest.raises(SystemExit):
        main(["prune", "--help"])
    entries: dict[str, str] = {}  # flag -> its lines of help, joined (long invocations put the help below)
    for ln in capsys.readouterr().out.splitlines():
        if ln.startswith("  -"):
            flag = ln.split()[0].rstrip(",")
            entries[flag] = ln
        elif ln.startswith("   ") and entries:
            entries[flag] += " " + ln.strip()
    seen = set()
    for cls, f, opt, _ in _config_options():
        line = entries.get(opt.flag)
        assert line is not None, f"{opt.flag} ({cls.__name__}.{f.name}) missing from prune --help"
        assert f.metadata["help"] in line
        default = getattr(cls(), f.name)
        if isinstance(default, bool):
            assert "[default: off]" in line, line
        else:
            shown = ",".join(map(str, default)) if isinstance(default, tuple) else str(default)
            assert f"[default: {'none' if default is None else shown}" in line, line
        seen.add(f.name)
    # Every field has a flag, except the nested trainer and the progress bars (-q).
    every = {f.name for cls in (PruneConfig, LearnConfig) for f in fields(cls)}
    assert every - seen == {"learn", "progress"}
    assert {"--checkpoint", "--sync", "--no-reconstruct", "--no-bf16", "--no-eval", "--n-calib"} <= {o.flag for *_, o, _ in
                                                                                     _config_options()}


# -- recipes: the nested schema, and a run replayed from its permsparse.json ---------------------------


def test_recipe_nested_schema_and_flag_names(tmp_path):
    from permsparse.cli import UsageError
    from permsparse.cli.recipe import load_recipe
    from permsparse.config import PruneConfig

    recipe = tmp_path / "r.json"
    nested = PruneConfig(pattern="4:8", sync=True).to_json()
    nested["learn"]["lr"] = 0.05
    nested["data"] = {"n_calib": 16}
    recipe.write_text(json.dumps(nested))
    got = load_recipe(recipe)
    assert (got["pattern"], got["sync"], got["lr"], got["n_calib"], got["average"]) == ("4:8", True, 0.05, 16,
                                                                                         [0.8, 0.9])
    recipe.write_text(json.dumps({"sync": True, "no-bf16": True, "groups": "auto", "average": "0.7",
                                  "tail-average": "off", "checkpoint": "c", "no-reconstruct": True}))
    got = load_recipe(recipe)
    assert got == {"sync": True, "bf16": False, "reconstruct": False, "groups": "auto", "average": (0.7,), "tail_average": None,
                   "checkpoint_path": "c"}
    recipe.write_text(json.dumps({"independent": True}))  # a recipe of an earlier release
    assert load_recipe(recipe) == {"sync": False}
    # A permsparse.json replays its recorded config, but not into the earlier run's checkpoint.
    plan = {"format_version": 1, "sites": [], "config": PruneConfig(learn={"checkpoint_path": "c", "lr": 0.1}).to_json()}
    recipe.write_text(json.dumps(plan))
    got = load_recipe(recipe)
    assert got["lr"] == 0.1 and "checkpoint_path" not in got
    recipe.write_text(json.dumps({"learn": {"pattern": "2:4"}}))  # a field in the wrong section
    with pytest.raises(UsageError, match=r"unknown option\(s\) learn\.pattern"):
        load_recipe(recipe)


def test_yaml_recipe_without_pyyaml_names_the_extra(model_dir, calib_txt, tmp_path, capsys, monkeypatch):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("pattern: '4:8'\n")
    monkeypatch.setitem(sys.modules, "yaml", None)  # import yaml raises ImportError
    rc = main(_prune(model_dir, calib_txt, tmp_path / "run", "--recipe", str(recipe)))
    assert rc == 2
    assert "pip install 'permsparse[yaml]'" in _one_error_line(capsys.readouterr().err)


def test_a_run_replays_from_its_permsparse_json(model_dir, calib_txt, tmp_path, capsys):
    """``--recipe OUT/permsparse.json`` runs the same configuration on the same data: the
    learned permutations are the same; a flag on the command line still wins."""
    first = tmp_path / "first"
    rc = main(_prune(model_dir, calib_txt, first, "--permutation", "learned", "--pattern", "4:8", "--groups", "2",
                     "--lr", "0.05", "--no-eval"))
    assert rc == 0, capsys.readouterr().err
    meta, sites, perms = read_plan(first)
    assert meta["config"]["learn"]["lr"] == 0.05 and meta["config"]["data"]["n_calib"] == 8
    assert sum(not p.is_identity() for p in perms.values()) > 0

    again = tmp_path / "again"
    rc = main(["prune", str(model_dir), "--recipe", str(first / PLAN_FILE), "--out", str(again), "-q"])
    assert rc == 0, capsys.readouterr().err
    meta2, sites2, perms2 = read_plan(again)
    assert sites2 == sites and all(perms2[s.name] == perms[s.name] for s in sites)
    assert meta2["config"] == meta["config"]
    assert meta2["metrics"]["guard"] == pytest.approx(meta["metrics"]["guard"])

    other = tmp_path / "other"
    rc = main(["prune", str(model_dir), "--recipe", str(first / PLAN_FILE), "--out", str(other), "-q",
               "--permutation", "none"])
    assert rc == 0, capsys.readouterr().err
    meta3, _, perms3 = read_plan(other)
    assert meta3["pattern"] == "4:8" and meta3["config"]["permutation"] == "none"
    assert all(p.is_identity() for p in perms3.values())


# -- exit codes, through a real process ------------------------------------------------------------


def _cli(args: list[str], fail: str | None = None) -> subprocess.CompletedProcess:
    """``permsparse ARGS`` in a fresh interpreter running this tree's package; ``fail="nan"``:
    the training loss turns NaN (a failure at run time), ``fail="bug"``: an unexpected exception."""
    boot = [
        "import sys, permsparse",
        f"assert permsparse.__file__ == {permsparse.__file__!r}, permsparse.__file__",
    ]
    if fail == "nan":
        boot += ["import permsparse.train.loop as L",
                 "real = L.task_loss",
                 "L.task_loss = lambda *a: tuple(x * float('nan') if i == 0 else x for i, x in enumerate(real(*a)))"]
    elif fail == "bug":
        boot += ["import permsparse.api as A",
                 "def boom(*a, **k): raise KeyError('an unexpected bug')",
                 "A.prune = boom"]
    boot += ["from permsparse.cli import main", f"sys.exit(main({args!r}))"]
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    return subprocess.run([sys.executable, "-c", "\n".join(boot)], capture_output=True, text=True, env=env,
                          timeout=300)


def test_exit_2_for_a_usage_error_in_one_line(model_dir, calib_txt, tmp_path):
    proc = _cli(_prune(model_dir, calib_txt, tmp_path / "run", "--score", "best"))
    assert proc.returncode == 2, proc.stderr
    line = _one_error_line(proc.stderr)
    assert "--score" in line and "best" in line and "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()


def test_exit_1_for_a_failure_at_run_time_in_one_line(model_dir, calib_txt, tmp_path):
    proc = _cli(_prune(model_dir, calib_txt, tmp_path / "run", "--permutation", "learned", "--objective", "e2e",
                       "--no-eval"), fail="nan")
    assert proc.returncode == 1, proc.stderr
    assert "loss became nan" in _one_error_line(proc.stderr)
    proc = _cli(_prune(model_dir, calib_txt, tmp_path / "run", "--no-eval"), fail="bug")
    assert proc.returncode == 1, proc.stderr
    assert "KeyError: 'an unexpected bug'" in _one_error_line(proc.stderr)
    assert not (tmp_path / "run").exists()


def test_traceback_only_with_verbose(model_dir, calib_txt, tmp_path):
    proc = _cli(_prune(model_dir, calib_txt, tmp_path / "run", "--no-eval", "-v"), fail="bug")
    assert proc.returncode == 1
    assert "Traceback (most recent call last)" in proc.stderr and "in boom" in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last == "permsparse: error: KeyError: 'an unexpected bug'"
    proc = _cli(_prune(model_dir, calib_txt, tmp_path / "run", "--pattern", "4:2", "-v"))
    assert proc.returncode == 2 and "Traceback" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("permsparse: error: invalid N:M pattern 4:2")
