"""Reports: the Markdown table, the PNG plots and ``write_report``."""

from __future__ import annotations

import logging
import sys

import pytest

from permsparse.models.apply import SiteReport
from permsparse.train.state import StepLog
from permsparse.report import markdown_table, plot_retained, plot_training, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
NAN = float("nan")


def _history(n: int = 12, blockwise: bool = False) -> list[StepLog]:
    out = []
    for i in range(n):
        tau = 0.05 ** (i / (n - 1))
        ce = NAN if blockwise else 3.0 - 0.05 * i
        kl = NAN if blockwise else 0.2 - 0.01 * i
        loss = 0.5 - 0.02 * i if blockwise else ce + kl
        out.append(StepLog(i % 6 if blockwise else i, loss, ce, kl, tau, 1.0 - i / n, 0.1 / (i + 1), 0.01))
    return out


def _reports(n: int = 6) -> list[SiteReport]:
    return [SiteReport(f"model.layers.{i // 2}.site{i % 2}", 0.70 + 0.01 * i, 0.74 + 0.01 * i, 0.80) for i in range(n)]


def _assert_png(path, min_bytes: int = 5_000) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > min_bytes


def _no_temp_files(folder) -> None:
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".")]


# -- markdown_table --------------------------------------------------------------------------


def test_markdown_table_formats_rows():
    rows = [{"method": "dense", "ppl": 12.3456789, "steps": 3}, {"method": "wanda", "ppl": 20.0, "kept": None}]
    text = markdown_table(rows)
    assert text.endswith("\n")
    lines = text.splitlines()
    assert lines[0] == "| method | ppl | steps | kept |"  # union of keys, first-seen order
    assert lines[1] == "|---|---|---|---|"
    assert lines[2] == "| dense | 12.35 | 3 |  |"  # default .4g; a missing key is blank
    assert lines[3] == "| wanda | 20 |  |  |"  # None is blank
    assert len(lines) == 4


def test_markdown_table_columns_and_float_format():
    rows = [{"a": 1.0 / 3.0, "b": "x", "c": True}]
    assert markdown_table(rows, columns=["c", "a"], floatfmt=".2f").splitlines() == [
        "| c | a |", "|---|---|", "| True | 0.33 |"]
    assert "| nan |" in markdown_table([{"v": NAN}])
    assert "| 1.235e+05 |" in markdown_table([{"v": 123456.7}])


def test_markdown_table_empty():
    assert markdown_table([]) == "_(no rows)_\n"


# -- plots -----------------------------------------------------------------------------------


def test_plots_return_none_for_empty_inputs(tmp_path):
    assert plot_training([], tmp_path / "training.png") is None
    assert plot_retained([], tmp_path / "retained.png") is None
    # Unstructured runs report NaN retained scores: nothing to plot either.
    assert plot_retained([SiteReport("s", NAN, NAN, NAN)], tmp_path / "retained.png") is None
    assert list(tmp_path.iterdir()) == []


def test_plot_training_writes_png(tmp_path):
    path = plot_training(_history(), tmp_path / "sub" / "training.png")  # creates the folder
    assert path == tmp_path / "sub" / "training.png"
    _assert_png(path)
    _no_temp_files(path.parent)


def test_plot_training_blockwise_history(tmp_path):
    """Block-wise records have NaN CE/KL; the loss curve is still drawn."""
    _assert_png(plot_training(_history(12, blockwise=True), tmp_path / "training.png"))


def test_plot_retained_writes_png(tmp_path):
    reports = _reports() + [SiteReport("unstructured", NAN, NAN, NAN)]  # NaN entries are skipped
    path = plot_retained(reports, tmp_path / "retained.png")
    assert path == tmp_path / "retained.png"
    _assert_png(path)
    _no_temp_files(tmp_path)


def test_plot_overwrites_existing_file(tmp_path):
    target = tmp_path / "training.png"
    target.write_bytes(b"old")
    plot_training(_history(), target)
    _assert_png(target)


# -- write_report ----------------------------------------------------------------------------


def test_write_report_full(tmp_path):
    out = tmp_path / "run"  # created by write_report
    summary = [{"model": "tiny", "pattern": "2:4", "ppl_dense": 10.0, "ppl": 12.5}]
    guard = {"none": 4.5156, "heuristic": 4.3978, "learned": 4.3966}
    path = write_report(out, "permsparse: tiny 2:4", summary, {"pattern": "2:4", "groups": 4}, _reports(),
                        _history(), guard, "learned")
    assert path == out / "report.md"
    _assert_png(out / "training.png")
    _assert_png(out / "retained.png")
    _no_temp_files(out)

    text = path.read_text()
    assert text.startswith("# permsparse: tiny 2:4\n")
    assert "| model | pattern | ppl_dense | ppl |" in text and "| tiny | 2:4 | 10 | 12.5 |" in text
    assert "The guard kept: **learned**." in text
    assert "| plan | calibration_loss |" in text
    for name, value in guard.items():
        assert f"| {name} | {value:.4g} |" in text
    assert "![training curves](training.png)" in text and "![retained](retained.png)" in text
    # Mean retained scores over the 6 sites: plain 72.50%, with permutation 76.50%, ceiling 80.00%.
    assert "Mean over 6 sites: plain N:M 72.50%, with permutation 76.50%, unstructured ceiling 80.00%." in text
    assert "## Configuration" in text and "pattern: 2:4\ngroups: 4" in text


def test_write_report_minimal(tmp_path):
    """No training and no N:M sites (e.g. unstructured): no plots, no dangling image links."""
    path = write_report(tmp_path, "plain", [{"method": "dense", "ppl": 10.0}], {},
                        reports=[SiteReport("s", NAN, NAN, NAN)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.md"]
    text = path.read_text()
    assert "training.png" not in text and "retained.png" not in text
    assert "The guard kept" not in text and "calibration_loss" not in text
    assert "| dense | 10 |" in text


def test_write_report_replaces_previous(tmp_path):
    write_report(tmp_path, "first", [{"a": 1}], {}, history=_history())
    write_report(tmp_path, "second", [{"a": 2}], {}, history=_history())
    text = (tmp_path / "report.md").read_text()
    assert text.startswith("# second\n") and "first" not in text
    _no_temp_files(tmp_path)


@pytest.mark.parametrize("kept", ["none", "heuristic"])
def test_write_report_guard_without_history(tmp_path, kept):
    guard = {"none": 1.0, "heuristic": 0.9, "learned": 1.1}
    text = write_report(tmp_path, "t", [], {}, guard=guard, kept_plan=kept).read_text()
    assert f"The guard kept: **{kept}**." in text and "_(no rows)_" in text
    assert not (tmp_path / "training.png").exists()


@pytest.fixture
def no_matplotlib(monkeypatch):
    for name in ("matplotlib", "matplotlib.pyplot"):
        monkeypatch.setitem(sys.modules, name, None)  # makes the import fail


def test_report_without_matplotlib_has_the_numbers_and_one_warning(tmp_path, no_matplotlib, caplog):
    with caplog.at_level(logging.WARNING, logger="permsparse.report"):
        path = write_report(tmp_path, "t", [{"ppl": 12.5}], {"pattern": "2:4"}, _reports(), _history(),
                            {"none": 1.0, "learned": 0.9}, "learned")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.md"]
    text = path.read_text()
    assert "Mean over 6 sites: plain N:M 72.50%" in text and "| 12.5 |" in text and "The guard kept" in text
    assert ".png" not in text
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "pip install 'permsparse[plots]'" in warnings[0].getMessage()


def test_a_plot_asked_for_without_matplotlib_names_the_extra(tmp_path, no_matplotlib):
    with pytest.raises(ImportError, match=r"needs the optional package matplotlib: pip install 'permsparse\[plots\]'"):
        plot_training(_history(), tmp_path / "training.png")
