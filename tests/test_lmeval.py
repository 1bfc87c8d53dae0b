"""lm-evaluation-harness accuracy (:func:`permsparse.evaluate.lm_eval_accuracy`).

The real-model test runs an offline, local multiple-choice cloze task: sentences of the
embedded Wikipedia corpus with their last word blanked, the true word among 3 distractor
words (last words of other sentences). Skipped when lm-eval (the ``eval`` extra) is absent.
"""

from __future__ import annotations

import json
import random
import re
import socket
import sys
from pathlib import Path

import pytest

from permsparse.evaluate import lm_eval_accuracy

TASK = "permsparse_cloze"
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_LAST_WORD = re.compile(r"^(?P<context>.*\S)\s+(?P<word>[a-z]{4,})\.$")


def cloze_items(articles: list[str], n: int, seed: int = 0) -> list[dict]:
    """``n`` cloze items ``{"context", "choices", "label"}`` from article text.

    A sentence of 8-40 words ending in a lowercase word of 4+ letters and a full stop gives
    the context (everything before that word) and the answer; the distractors are 3 other
    answers drawn from the whole pool, and the 4 choices are shuffled (seeded).
    """
    candidates = []
    for article in articles:
        for paragraph in article.split("\n"):
            for sentence in _SENTENCE_END.split(paragraph.strip()):
                m = _LAST_WORD.match(sentence)
                if m and 8 <= len(sentence.split()) <= 40:
                    candidates.append((m["context"], m["word"]))
    rng = random.Random(seed)
    rng.shuffle(candidates)
    pool = sorted({word for _, word in candidates})
    items = []
    for context, word in candidates[:n]:
        distractors = rng.sample([w for w in pool if w != word], 3)
        choices = [word, *distractors]
        rng.shuffle(choices)
        items.append({"context": context, "choices": choices, "label": choices.index(word)})
    return items


def write_cloze_task(folder: Path, items: list[dict]) -> Path:
    """Write ``items`` as JSONL plus an lm-eval task YAML (``task: permsparse_cloze``) into ``folder``."""
    import yaml

    data = folder / "cloze.jsonl"
    data.write_text("".join(json.dumps(item) + "\n" for item in items), encoding="utf-8")
    config = {
        "task": TASK,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{context}}",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{label}}",
        "target_delimiter": " ",
        "metric_list": [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
        ],
    }
    (folder / f"{TASK}.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return folder


def _no_network(sock, address):
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        raise AssertionError(f"network access attempted: {address}")
    return _CONNECT(sock, address)


_CONNECT = socket.socket.connect


def test_missing_lm_eval_raises_install_hint(monkeypatch):
    for name in [m for m in sys.modules if m == "lm_eval" or m.startswith("lm_eval.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # makes `import lm_eval` fail
    with pytest.raises(ImportError, match=r"needs the optional package lm-eval: pip install 'permsparse\[eval\]'"):
        lm_eval_accuracy(object(), object(), ["hellaswag"])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"tasks": []}, "at least one"),
        ({"tasks": ["x"], "batch_size": 0}, "batch_size"),
        ({"tasks": ["x"], "limit": 0}, "limit"),
        ({"tasks": ["x"], "num_fewshot": -1}, "num_fewshot"),
        ({"tasks": ["x"], "tokenizer": None}, "tokenizer is required"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lm_eval_accuracy(**{"model": object(), "tokenizer": object(), **kwargs})


def test_unknown_task_is_rejected_before_the_model_is_used(tmp_path):
    pytest.importorskip("lm_eval")
    write_cloze_task(tmp_path, cloze_items(["Title\n\nThe cat sat on the warm kitchen mat."], n=1))
    # The model/tokenizer are placeholders: the name check must come first.
    with pytest.raises(ValueError, match=r"unknown lm-eval task.*'no_such_task_xyz'"):
        lm_eval_accuracy(object(), object(), [TASK, "no_such_task_xyz"], include_path=str(tmp_path))


def test_smollm2_cloze_accuracy_above_chance(smollm2, tmp_path, monkeypatch):
    """Offline local task, real model: 20 items, well above the 4-way chance of 0.25 (measured 0.90)."""
    pytest.importorskip("lm_eval")
    from permsparse.data.wikipedia import load_wikipedia_articles

    model, tokenizer = smollm2
    items = cloze_items(load_wikipedia_articles(), n=20)
    # Everything is local: any network connection attempt (e.g. a Hub lookup by `datasets`)
    # fails the test instead of hanging or silently downloading.
    monkeypatch.setattr(socket.socket, "connect", _no_network)
    assert len(items) == 20
    (tmp_path / "tasks").mkdir()
    write_cloze_task(tmp_path / "tasks", items)
    pad_before = tokenizer.pad_token
    mode_before = model.training

    acc = lm_eval_accuracy(model, tokenizer, [TASK], include_path=str(tmp_path / "tasks"), limit=20, batch_size=8)

    assert set(acc) == {TASK}
    assert isinstance(acc[TASK], float) and 0.0 <= acc[TASK] <= 1.0
    assert acc[TASK] > 0.25, f"SmolLM2 at or below chance on 4-way cloze: {acc[TASK]:.2f}"
    # The caller's objects are left as they were.
    assert tokenizer.pad_token == pad_before and model.training == mode_before
