"""`compare`'s tables read back, to check each cell against the runs' own metrics files."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest

SPREAD = re.compile(r"(\d+\.\d\d) \((\d+\.\d\d)-(\d+\.\d\d)\)")


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
