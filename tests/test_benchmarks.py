"""The paper-scale benchmark's CPU path at a tiny scale: it writes its set, reuses it, and prints every figure.

In-process (each model's own process in the real run costs a torch import); timing values are never checked.
"""

from __future__ import annotations

import dataclasses
import json

import pytest

from benchmarks import paper_scale
from features.reader import open_features
from train.config import MODEL_NAMES

TINY = 0.004  # 20 train and 3 val clips


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("paper_scale") / "set"
    paper_scale.ensure_set(root, TINY)
    return root


def test_paper_scale_writes_a_cheavd_shaped_set_and_reuses_it(tiny_set):
    root = tiny_set
    description = json.loads((root / paper_scale.SET_FILE).read_text())
    assert description["splits"] == {"train": 20, "val": 3}
    with open_features(root / "train") as features:
        assert len(features) == 20
        assert features.attrs["context_dim"] == paper_scale.PAPER_CONTEXT_DIM
    written = {path: path.stat().st_mtime_ns for path in root.rglob("*.h5")}
    assert paper_scale.ensure_set(root, TINY) == description
    assert {path: path.stat().st_mtime_ns for path in root.rglob("*.h5")} == written


def test_paper_scale_refuses_a_folder_holding_something_else(tmp_path):
    (tmp_path / "mine.txt").write_text("a user's file")
    with pytest.raises(SystemExit, match="holds something other"):
        paper_scale.ensure_set(tmp_path, TINY)
    assert (tmp_path / "mine.txt").read_text() == "a user's file"


def test_paper_scale_measures_a_model_and_prints_every_figure(tiny_set, capsys):
    root = tiny_set
    measured = paper_scale.measure_model("face", str(root), 1, "cpu")
    floor = paper_scale.encoder_floor(str(root), "cpu")
    figures = [dataclasses.replace(measured, model=name) for name in MODEL_NAMES]
    paper_scale.print_floor(floor, "before the models")
    paper_scale.print_header()
    for figure in figures:
        paper_scale.print_row(figure)
    paper_scale.print_targets(figures, floor)
    out = capsys.readouterr().out
    assert "encoder floor" in out and "peak RSS" in out
    for name in MODEL_NAMES:
        assert any(line.startswith(f"{name} ") and line.endswith(" GB         -") for line in out.splitlines())
    for name in MODEL_NAMES:
        assert f"  {name}: waiting for data" in out and "one read of its shards" in out
    assert "caca epoch =" in out and "the encoder floor" in out
    assert "Table I protocol (6 RNNs x 5 seeds x 30 epochs" in out
