"""The paper's protocol (its Table I): every model trained with several seeds, median validation scores.

Runs live in OUT/MODEL-seedS/ and are ordinary training runs; a run whose metrics.json
exists is finished and reused, so an interrupted comparison resumes where it stopped.
The table (OUT/table.md and OUT/table.csv) gives, per model, the median mAP and accuracy
over seeds with their min-max, our parameter count and the paper's values. With models that
hear among them, the MEC 2017 organisers' baselines follow as reference rows (their test-set
figures, in a column of their own: not this paper's, and not trained here).

With both `caca` and `c3d` compared, the paper's Table II follows (OUT/table-ii.csv): per
seed, the ensemble of caca-seedS and c3d-seedS fitted on the validation split
(OUT/ensemble-seedS/, train/ensemble.py), beside each member alone, on validation and, when
the features root has a labelled test split, on it (the ensemble's validation scores are on
the data its weights were fitted on, as the paper's are).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import os
from pathlib import Path
from statistics import median
from typing import Callable

import torch
from joblib import Parallel, delayed
from tqdm import tqdm

from outputs import claim_folder, is_temporary, write_atomically
from train.config import (
    AUDIO_MODELS, DEFAULT_COMPARE, DEFAULT_TEST_SPLIT, SPATIOTEMPORAL, TRAINABLE_MODELS, TrainConfig, TrainError,
)
from train.data import check_inputs_held, open_split
from train.ensemble import fit_ensemble
from train.evaluation import evaluate_run
from train.layout import COMPLETE_MARK, run_name, run_name_pattern
from train.loop import stored_differences, train_model
from train.models import build_model, feature_dims, paper_parameter_count, parameter_counts, parameter_report
from train.runs import ENSEMBLE_MODEL, read_metrics

# Table I: validation mAP and accuracy (%) on MEC 2017, median of five seeds.
PAPER_TABLE_I = {
    "face": (38.87, 52.72),
    "context": (28.74, 37.68),
    "parallel": (40.44, 54.30),
    "concat": (39.78, 54.15),
    "caca": (40.73, 53.01),
    "caca-b": (39.91, 54.44),
}
# Table II: the paper's MEC 2017 submissions, (val mAP, val acc, test mAP, test acc) in %. It
# gives no 2D-3D-CNN alone. Read from the PDF's text, whose cells come out of order: rows
# ordered so CACA-RNN has the higher test mAP and the ensemble the higher test accuracy, as
# section VI says.
ENSEMBLE_ROW = "ensemble (caca+c3d)"
PAPER_TABLE_II = {
    "caca": (41.53, 51.34, 45.51, 47.30),
    ENSEMBLE_ROW: (52.16, 56.58, 44.74, 52.99),
}
ENSEMBLED = ("caca", SPATIOTEMPORAL)
NOT_IN_PAPER = "-"
# The MEC 2017 organisers' SVM baselines, macro average precision (%) on the challenge's test set per
# sub-challenge (Li et al., "MEC 2017: Multimodal Emotion Recognition Challenge", ACII Asia 2018; the
# paper cites the video one). Reference rows of Table I beside the models that hear.
MEC_BASELINES = {"audio": 39.2, "video": 21.7, "audio-visual": 35.7}
BASELINE_ROW = "MEC 2017 {} baseline (organisers' SVM)"
BASELINE_COLUMN = "MEC 2017 baseline test mAP %"
NOT_TRAINED = "not trained here"
TABLE_FILES = ("table.md", "table.csv", "table-ii.csv", "parameters.txt")
RUN_FOLDER = run_name_pattern((*TRAINABLE_MODELS, ENSEMBLE_MODEL))


def writes_into_comparison(name: str) -> bool:
    """The names `compare` writes in its folder: its tables and one folder per run and ensemble."""
    return name in TABLE_FILES or RUN_FOLDER.fullmatch(name) is not None or is_temporary(name)


def _train_one(config: TrainConfig, threads: int, overwrite: bool) -> None:
    torch.set_num_threads(threads)
    train_model(config, progress=False, overwrite=overwrite)


def run_compare(
    base: TrainConfig, models: list[str], seeds: int, out: Path = DEFAULT_COMPARE, jobs: int = 1,
    log: Callable[[str], None] = print, test_split: str = DEFAULT_TEST_SPLIT, overwrite: bool = False,
) -> Path:
    """Train what is missing, then write the table; returns the Markdown table's path.

    A finished run in `out` is reused when it was trained with the same settings; one trained
    otherwise is refused (it would make the table mix settings), or retrained with `overwrite`.
    """
    claim_folder(out, "compare", overwrite, writes_into_comparison)
    check_features_fit(base, models)
    configs = [
        dataclasses.replace(base, model=model, seed=seed, out=out / run_name(model, seed))
        for model in models
        for seed in range(seeds)
    ]
    pending = [c for c in configs if not finished_as(c, overwrite)]
    log(f"{len(configs) - len(pending)} of {len(configs)} runs already finished; training {len(pending)}")
    threads = max(1, (os.cpu_count() or 1) // jobs)
    if jobs == 1:
        for config in pending:
            log(f"training {config.model}, seed {config.seed}")
            train_model(config, progress=True, log=log, overwrite=overwrite)
    else:
        runs = Parallel(n_jobs=jobs, return_as="generator_unordered")(
            delayed(_train_one)(config, threads, overwrite) for config in pending
        )
        for _ in tqdm(runs, total=len(pending), unit="run", desc=f"compare, {jobs} at once"):
            pass
    lines = table_i(base, models, seeds, out)
    if all(model in models for model in ENSEMBLED):
        fit_missing_ensembles(base, seeds, out, log)
        lines += table_ii(base, seeds, out, test_split)
    table = out / "table.md"
    write_atomically(table, lambda tmp: tmp.write_text("\n".join(lines) + "\n"))
    return table


def check_features_fit(base: TrainConfig, models: list[str]) -> None:
    """TrainError before any training when a model reads what the features lack (the voice, in sets without audio)."""
    with open_split(base.features, base.train_split) as features:
        attrs = features.attrs
    for model in models:
        with torch.device("meta"):  # only its inputs are wanted: nothing allocated
            inputs = build_model(model, num_classes=len(attrs["classes"]), **feature_dims(attrs)).inputs
        check_inputs_held(attrs, inputs, model, Path(base.features) / base.train_split)


def finished_as(config: TrainConfig, overwrite: bool) -> bool:
    """Whether the run folder holds a finished run of `config` (reused); TrainError when it holds one
    trained with other settings, unless `overwrite` (then it is trained again)."""
    folder = config.run_folder
    if not (folder / COMPLETE_MARK).exists():
        return False
    differences = stored_differences(folder, config)
    if differences and not overwrite:
        raise TrainError(f"{folder} is a finished run of other settings (there != here: {'; '.join(differences)}):"
                         " use another --out, or pass --overwrite to train it again")
    return not differences


def _run_scores(folder: Path) -> tuple[float, float]:
    """(mAP %, accuracy %) of a finished run or ensemble, from its metrics.json."""
    metrics = read_metrics(folder)
    if metrics is None:
        raise TrainError(f"{folder / COMPLETE_MARK}: not the metrics of a run (mAP and accuracy between 0 and 1,"
                         " per-class AP, confusion, classes, count); train the run again")
    return metrics.map * 100, metrics.accuracy * 100


def _table(csv_path: Path, header: list[str], rows: list[list[str]]) -> list[str]:
    """Write the rows as CSV; return them as Markdown lines (after a blank line)."""
    text = io.StringIO()
    csv.writer(text, lineterminator="\n").writerows([header, *rows])
    write_atomically(csv_path, lambda tmp: tmp.write_text(text.getvalue()))
    return ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


def _spread(values: list[float]) -> str:
    return f"{median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def table_i(base: TrainConfig, models: list[str], seeds: int, out: Path) -> list[str]:
    """Table I's lines for table.md (writing table.csv and parameters.txt beside it)."""
    with open_split(base.features, base.train_split) as features:
        dims, classes = feature_dims(features.attrs), len(features.attrs["classes"])
    header = ["model", "val mAP % median (min-max)", "val acc % median (min-max)", "params",
              "paper mAP %", "paper acc %", "paper params"]
    rows = []
    for model in models:
        scores = [_run_scores(out / run_name(model, seed)) for seed in range(seeds)]
        total, _ = parameter_counts(build_model(model, num_classes=classes, **dims))
        paper = [f"{value:.2f}" for value in PAPER_TABLE_I[model]] if model in PAPER_TABLE_I else [NOT_IN_PAPER] * 2
        rows.append([model, _spread([s[0] for s in scores]), _spread([s[1] for s in scores]),
                     f"{total / 1e6:.2f}M", *paper, paper_parameter_count(model)])
    note = ""
    if any(model in AUDIO_MODELS for model in models):
        header, note = [*header, BASELINE_COLUMN], BASELINES_NOTE
        rows = [*([*row, NOT_IN_PAPER] for row in rows), *baseline_rows()]
    lines = [
        f"Validation split '{base.val_split}', {seeds} seed(s) per model, features {base.features}"
        f" (context_dim {dims['context_dim']}). The paper's figures are its Table I (MEC 2017 validation set);"
        f" parameters.txt beside this table says how our parameter counts differ from the paper's.{note}",
        *_table(out / "table.csv", header, rows),
    ]
    report = parameter_report(dims["context_dim"], classes) + "\n"
    write_atomically(out / "parameters.txt", lambda tmp: tmp.write_text(report))
    return lines


BASELINES_NOTE = (
    f" The rows '{BASELINE_ROW.format('...')}' are the challenge organisers' SVM baselines, macro average"
    " precision on the MEC 2017 test set (Li et al., \"MEC 2017: Multimodal Emotion Recognition Challenge\","
    " ACII Asia 2018): references beside the models that hear, not this paper's figures, and not trained here."
)


def baseline_rows() -> list[list[str]]:
    """Table I's reference rows: the MEC 2017 baselines, with no figure but their test mAP."""
    return [[BASELINE_ROW.format(modality), NOT_TRAINED, NOT_TRAINED, *[NOT_IN_PAPER] * 4, f"{value:.2f}"]
            for modality, value in MEC_BASELINES.items()]


def ensemble_folder(out: Path, seed: int) -> Path:
    return out / run_name(ENSEMBLE_MODEL, seed)


def fit_missing_ensembles(base: TrainConfig, seeds: int, out: Path, log: Callable[[str], None]) -> None:
    for seed in range(seeds):
        if not (ensemble_folder(out, seed) / COMPLETE_MARK).exists():
            log(f"fitting the ensemble of {' and '.join(ENSEMBLED)}, seed {seed}, on {base.val_split}")
            members = [out / run_name(model, seed) for model in ENSEMBLED]
            fit_ensemble(members, base.val_split, base.features, ensemble_folder(out, seed), base.device)


def labelled_split_scores(folder: Path, base: TrainConfig, test_split: str) -> tuple[float, float] | None:
    """(mAP %, accuracy %) on the test split, None when it has no labels."""
    metrics = evaluate_run(folder, test_split, base.features, base.device)
    return None if metrics is None else (metrics.map * 100, metrics.accuracy * 100)


def table_ii(base: TrainConfig, seeds: int, out: Path, test_split: str) -> list[str]:
    """Table II's lines (c3d, caca, their ensemble) for table.md, under Table I (writing table-ii.csv)."""
    has_test = (Path(base.features) / test_split).is_dir()
    folders = {model: [out / run_name(model, seed) for seed in range(seeds)] for model in (SPATIOTEMPORAL, "caca")}
    folders[ENSEMBLE_ROW] = [ensemble_folder(out, seed) for seed in range(seeds)]
    header = ["model", "val mAP %", "val acc %", f"{test_split} mAP %", f"{test_split} acc %",
              "paper val mAP %", "paper val acc %", "paper test mAP %", "paper test acc %"]
    rows = []
    for name, runs in folders.items():
        val = [_run_scores(folder) for folder in runs]
        test = [labelled_split_scores(folder, base, test_split) for folder in runs] if has_test else [None]
        test_cells = ([_spread([s[0] for s in test]), _spread([s[1] for s in test])] if None not in test
                      else ["no labelled test split"] * 2)
        paper = [f"{value:.2f}" for value in PAPER_TABLE_II[name]] if name in PAPER_TABLE_II else [NOT_IN_PAPER] * 4
        rows.append([name, _spread([s[0] for s in val]), _spread([s[1] for s in val]), *test_cells, *paper])
    lines = [
        "",
        f"Table II: c3d, caca and their ensemble (weights fitted on '{base.val_split}', so its validation scores"
        f" are on the data it was fitted on), median (min-max) over {seeds} seed(s); the paper's figures are one"
        " submission each (MEC 2017), and it gives no 2D-3D-CNN alone.",
        *_table(out / "table-ii.csv", header, rows),
    ]
    return lines
