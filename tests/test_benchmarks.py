"""The CPU paths of the paper-scale benchmark and of the GPU check, at a tiny scale: they write their sets,
reuse them, and print every figure.

In-process where they can be (each model's own process in the real runs costs a torch import); timing values are
never checked.
"""

from __future__ import annotations

import dataclasses
import json
import re

import numpy as np
import pytest

from benchmarks import extract_benchmark, gpu_check, open_benchmark, paper_scale
from features.reader import open_features
from train.config import MODEL_NAMES
from train.packed import CACHE_ENV as STEPS_CACHE_ENV

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
        assert features.attrs["audio_dim"] == description["audio_dim"] == 128  # every model can be timed on it
        heard = np.concatenate([features[clip_id]["has_audio"] for clip_id in features.clip_ids])
        assert 0.8 < heard.mean() < 1
    written = {path: path.stat().st_mtime_ns for path in root.rglob("*.h5")}
    assert paper_scale.ensure_set(root, TINY) == description
    assert {path: path.stat().st_mtime_ns for path in root.rglob("*.h5")} == written


def test_paper_scale_refuses_a_folder_holding_something_else(tmp_path):
    (tmp_path / "mine.txt").write_text("a user's file")
    with pytest.raises(SystemExit, match="holds something other"):
        paper_scale.ensure_set(tmp_path, TINY)
    assert (tmp_path / "mine.txt").read_text() == "a user's file"


def test_paper_scale_measures_a_model_and_prints_every_figure(tiny_set, capsys, monkeypatch, tmp_path):
    root = tiny_set
    monkeypatch.setenv(STEPS_CACHE_ENV, str(tmp_path / "steps"))  # measure_model points it at a folder of its own
    measured = paper_scale.measure_model("face", str(root), 1, "cpu")
    floor = paper_scale.encoder_floor(str(root), "cpu")
    figures = [dataclasses.replace(measured, model=name) for name in MODEL_NAMES]
    paper_scale.print_floor(floor, "before the models")
    paper_scale.print_header()
    for figure in figures:
        paper_scale.print_row(figure)
    paper_scale.print_targets(figures, floor)
    paper_scale.print_jobs_memory("face", *paper_scale.jobs_memory(root, "cpu", "face"))
    out = capsys.readouterr().out
    assert "encoder floor" in out and "peak RSS" in out and "cache made" in out
    assert measured.cache_made > 0 and measured.startup > 0
    for name in MODEL_NAMES:
        assert any(line.startswith(f"{name} ") and line.endswith(" GB         -") for line in out.splitlines())
    for name in MODEL_NAMES:
        assert f"  {name}: waiting for data" in out and "one read of its shards" in out
        assert "first run, making the steps cache" in out and "later runs, mapping it" in out
    assert "caca epoch =" in out and "the encoder floor" in out
    assert "Table I protocol (6 RNNs x 5 seeds x 30 epochs" in out
    assert re.search(r"memory of `compare --jobs 2` \(face, two seeds at once\) against one `train` of it .*"
                     r"[\d.]+ GB vs [\d.]+ GB, [\d.]+x \(target <= 1.3x\): (met|NOT met)", out)


def agreement_figures(out: str, run: str) -> dict[str, float]:
    """The GPU check's agreement line for `run`: has_face alike (a share) and each min / median."""
    line = next(line for line in out.splitlines() if line.startswith(f"  {run} ") and "has_face" in line)
    alike, frames = map(int, re.search(r"has_face (\d+)/(\d+) frames alike", line).groups())
    figures = {"has_face": alike / frames}
    for name in ("box IoU", "face cosine", "context cosine"):
        low, median = map(float, re.search(rf"{name} ([\d.]+) / ([\d.]+)", line).groups())
        figures[f"{name} min"], figures[f"{name} median"] = low, median
    return figures


def test_gpu_check_cpu_path_prints_every_figure_and_cpu_float32_agrees_with_itself(tmp_path, capsys, monkeypatch):
    """`--device cpu`: the CPU reference against a second CPU float32 extraction (identical features) and against
    bfloat16, the CPU's 16-bit type in float16's place (close ones); one model's paper-scale epoch, trained in this
    process rather than a fresh one."""
    monkeypatch.setattr(gpu_check, "in_fresh_process", lambda function, *args: function(*args))
    # measure_model points the steps cache at a folder of its own, meant for a fresh process: restored after.
    monkeypatch.setenv(STEPS_CACHE_ENV, str(tmp_path / "steps"))
    code = gpu_check.main(["--work", str(tmp_path), "--device", "cpu", "--clips", "2", "--seconds", "0.4",
                           "--repeats", "1", "--scale", str(TINY), "--epochs", "1", "--models", "face"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert re.search(r"  decoding alone +[\d.]+ sampled frames/s \(4 frames\)", out)
    speed = r" +[\d.]+ sampled frames/s, [\d.]+x decoding alone's time: limited by (decoding|the networks)"
    assert re.search(rf"  cpu float32{speed} \(the reference\)", out)
    for run in ("cpu float32", "cpu bfloat16"):
        assert re.search(rf"  {run}{speed}; [\d.]+x the reference's speed \(target on a GPU: limited by decoding, at"
                         r" most 1.25x its time: (met|NOT met)\)", out)
    assert agreement_figures(out, "cpu float32") == pytest.approx(
        {"has_face": 1, **{f"{name} {stat}": 1 for name in ("box IoU", "face cosine", "context cosine")
                           for stat in ("min", "median")}})
    half = agreement_figures(out, "cpu bfloat16")
    assert half["has_face"] == 1
    assert all(0.9 < value <= 1.0 for value in half.values()), half
    assert "faces in 2 vs 2" in out  # a clip with a face, one without
    assert re.search(r"  face +epoch +[\d.]+ s, at the paper's scale +[\d.]+ s \(target < 5 s: (met|NOT met)\);"
                     r" waiting for data [\d.]+ s = [\d.]+% \(target <= 5%: (met|NOT met)\);"
                     r" GPU memory - \(not a GPU\)", out)
    assert "failed" not in out


def test_open_benchmark_opens_its_set_both_ways_in_fresh_processes_and_prints_each_figure(tmp_path, capsys):
    folder = tmp_path / "open"
    open_benchmark.ensure_set(folder, 2, 3)
    open_benchmark.ensure_set(folder, 2, 3)  # reused
    figures = open_benchmark.measure(folder, 1)
    assert {way: [figure["clips"] for figure in found] for way, found in figures.items()} == {
        "in-process": [6], "look": [6]}
    open_benchmark.report(figures, "with its index")
    out = capsys.readouterr().out
    for way in open_benchmark.WAYS:
        assert re.search(rf"  with its index, {way} *: first open \d+ ms \(\d+-\d+\), second open \d+ ms", out)
    assert re.search(r"the look adds -?\d+ ms to a command's first open \(target <= 1 s\): (met|NOT met)", out)


def test_extract_benchmark_times_the_voice_against_none_and_the_audio_alone_against_a_bare_loop(tmp_path,
                                                                                                 extraction_weights):
    paths = [extract_benchmark.make_clip(tmp_path / f"clip{i}.mp4", scene, 1.0)
             for i, scene in enumerate(extract_benchmark.SCENES[:2])]
    rows = extract_benchmark.audio_rows(paths, dict(context_backbone="mobilenet_v2", device="cpu"), tmp_path, rounds=1)
    assert re.fullmatch(r"8\. audio: extraction with the voice [\d.]+ clips/s, without [\d.]+: [\d.]+x the time"
                        r" \(median of 1 rounds; target <= 1\.10\)", rows[0]), rows[0]
    assert re.fullmatch(r"   the audio alone: \d+ s of audio a second, [\d.]+x a bare loop's time \(PyAV decode and"
                        r" resample, librosa's mel spectrogram: \d+ s a second\)", rows[1]), rows[1]
