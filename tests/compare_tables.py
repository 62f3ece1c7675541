"""`compare`'s tables read back, to check each cell against the runs' own metrics files."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest

from features.labels import CHEAVD_CLASSES
from train.config import AUDIO_MODELS
from train.models import build_model, parameter_counts

SPREAD = re.compile(r"(\d+\.\d\d) \((\d+\.\d\d)-(\d+\.\d\d)\)")
# Table I of the paper (validation mAP and accuracy %, parameters), as printed in it.
PAPER_ROWS = {"face": ["38.87", "52.72", "1.58M"], "context": ["28.74", "37.68", "1.19M"],
              "parallel": ["40.44", "54.30", "0.86M"], "concat": ["39.78", "54.15", "1.38M"],
              "caca": ["40.73", "53.01", "0.79M"], "caca-b": ["39.91", "54.44", "0.79M"]}
NOT_IN_PAPER = ["-", "-", "not given"]
# The MEC 2017 organisers' SVM baselines, test-set macro average precision % (Li et al., ACII Asia 2018).
BASELINE_ROWS = {f"MEC 2017 {modality} baseline (organisers' SVM)": [*["not trained here"] * 2, *["-"] * 4, value]
                 for modality, value in (("audio", "39.20"), ("video", "21.70"), ("audio-visual", "35.70"))}


def csv_rows(path: Path) -> dict[str, list[str]]:
    """A table CSV's rows by their first cell (the model), header left out."""
    with open(path, newline="") as file:
        rows = list(csv.reader(file))
    return {row[0]: row[1:] for row in rows[1:]}


def markdown_tables(path: Path) -> list[dict[str, list[str]]]:
    """Each Markdown table of the file, as its rows by first cell (header and rule left out)."""
    tables, rows = [], []
    for line in [*path.read_text().splitlines(), ""]:
        if line.startswith("|"):
            rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
        elif rows:
            tables.append({row[0]: row[1:] for row in rows[2:]})
            rows = []
    return tables


def percent_scores(metrics_file: Path) -> tuple[float, float]:
    """(mAP %, accuracy %) from a metrics.json."""
    metrics = json.loads(metrics_file.read_text())
    return metrics["map"] * 100, metrics["accuracy"] * 100


def assert_spread(cell: str, values: list[float]) -> None:
    """`cell` reads "median (min-max)" of `values`, each rounded to two decimals."""
    match = SPREAD.fullmatch(cell)
    assert match, cell
    shown = [float(number) for number in match.groups()]
    assert shown == pytest.approx([np.median(values), min(values), max(values)], abs=0.005 + 1e-9), cell


def assert_table_i(out: Path, models: list[str], seeds: int, context_dim: int, audio_dim: int = 0) -> None:
    """Every cell of compare's Table I, in table.md and table.csv alike: each model's median (min-max) of its
    runs' metrics, its parameters, the paper's figures or none, and with models that hear the MEC 2017
    baselines' rows (and their column) after the models'."""
    (markdown, *_), csv_table = markdown_tables(out / "table.md"), csv_rows(out / "table.csv")
    assert markdown == csv_table
    hearing = any(model in AUDIO_MODELS for model in models)
    assert list(csv_table) == [*models, *(BASELINE_ROWS if hearing else [])]
    for model in models:
        row = csv_table[model]
        scores = [percent_scores(out / f"{model}-seed{seed}" / "metrics.json") for seed in range(seeds)]
        assert_spread(row[0], [map_ for map_, _ in scores])
        assert_spread(row[1], [accuracy for _, accuracy in scores])
        total, _ = parameter_counts(build_model(model, context_dim, len(CHEAVD_CLASSES), audio_dim=audio_dim))
        paper = PAPER_ROWS.get(model, NOT_IN_PAPER)
        assert row[2:] == [f"{total / 1e6:.2f}M", *paper, *(["-"] if hearing else [])], model
    for name, cells in BASELINE_ROWS.items() if hearing else ():
        assert csv_table[name] == cells
    with open(out / "table.csv", newline="") as file:
        header = next(csv.reader(file))
    assert header[-1] == ("MEC 2017 baseline test mAP %" if hearing else "paper params")
