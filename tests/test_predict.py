"""predict on raw videos: a tiny real run, the run's exact extraction, per-file failures, CSV and pictures (with the
audio of a clip with a real AAC track, and of one without a track)."""

from __future__ import annotations

import json
import subprocess
import sys
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import cli as cli_module
import predict.predict as predict_module
from extract.pipeline import extract_split
from extract.settings import ExtractSettings
from extract.retinaface import RetinaFaceDetector
from extract.video import VideoError
from manifests.builders import build_folder
from manifests.manifest import write_manifest
from predict.explain import THUMBNAIL_SIDE, explain_clip, explanation, frames_to_show, thumbnails
from predict.predict import Prediction, PredictError, collect_videos, predict_videos, step_frames
from report.audio import NO_AUDIO_COLOUR, Voice
from tests.conftest import QUIET, quiet
from tests.media import brightness, burst_frames, burst_track, photo, write_av_clip, write_clip
from tests.media import moving_face
from train.ensemble import fit_ensemble
from train.config import TrainConfig
from train.evaluation import evaluate_run
from train.loop import train_model

GOOD = {"coffee.mp4", "more/rocket.mp4", "cat.mp4"}
# The ids the dataset fixture's manifest gives its clips: SPLIT/LABEL/NAME without the suffix.
DATASET_IDS = {"train": {"train/happy/coffee", "train/happy/rocket", "train/neutral/cat"},
               "val": {"val/happy/rocket", "val/neutral/cat"}}
BAD = {"empty.mp4", "notes.mp4", "gone.mp4"}
# coffee.mp4 (2 s) has an AAC track from AUDIO_START on: a hum with a 1 kHz burst at BURST (video time), which the
# frame at 1.2 s hears whole; the other videos have no track.
AUDIO_START, BURST, RATE = 0.3, (1.1, 1.3), 44100


def cat(frames: int) -> list[np.ndarray]:
    return [photo("chelsea")] * frames


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, extraction_weights):
    root = tmp_path_factory.mktemp("dataset")
    clips = {
        "train/happy/coffee.mp4": moving_face("coffee", frames=20),
        "train/happy/rocket.mp4": moving_face("rocket", frames=20),
        "train/neutral/cat.mp4": cat(15),
        "val/happy/rocket.mp4": moving_face("rocket", frames=15, step=6),
        "val/neutral/cat.mp4": cat(10),
    }
    for rel, frames in clips.items():
        (root / "data" / rel).parent.mkdir(parents=True, exist_ok=True)
        write_clip(root / "data" / rel, frames)
    write_manifest(build_folder(root / "data"), root / "m.csv")
    return root


@pytest.fixture(scope="module")
def run(dataset):
    for split in ("train", "val"):
        settings = ExtractSettings(split, manifest=dataset / "m.csv", out=dataset / "features",
                                   context_backbone="mobilenet_v2", device="cpu")
        extract_split(settings, **QUIET)
    config = TrainConfig("caca", features=dataset / "features", out=dataset / "run", epochs=2, device="cpu")
    train_model(config, **QUIET)
    return dataset / "run"


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("videos")
    (folder / "more").mkdir()
    write_av_clip(folder / "coffee.mp4", moving_face("coffee", frames=50), burst_track(2.0, RATE, BURST, AUDIO_START),
                  RATE, "aac", "stereo", fps=25, audio_start=AUDIO_START)
    write_clip(folder / "more" / "rocket.mp4", moving_face("rocket", frames=25))
    write_clip(folder / "cat.mp4", cat(15))
    (folder / "empty.mp4").write_bytes(b"")
    (folder / "notes.mp4").write_text("not a video")
    return folder


@pytest.fixture(scope="module")
def explained() -> dict[str, tuple[tuple, dict]]:
    """Picture file (below the --explain folder) -> the arguments `predicted` drew it with."""
    return {}


@pytest.fixture(scope="module")
def predicted(run, videos, tmp_path_factory, explained):
    out = tmp_path_factory.mktemp("out")
    lines: list[str] = []
    inputs = [videos, videos / "gone.mp4"]
    real_explain_clip = predict_module.explain_clip

    def explain_clip(path, *args, **kwargs):
        explained[Path(path).relative_to(out / "explain").as_posix()] = args, kwargs
        return real_explain_clip(path, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(predict_module, "explain_clip", explain_clip)
        predictions, failures = predict_videos(run, inputs, device="cpu", explain_dir=out / "explain",
                                               out_csv=out / "predictions.csv", log=lines.append)
    return out, {p.clip_id: p for p in predictions}, failures, lines


def classes_of(run: Path) -> list[str]:
    return json.loads((run / "features.json").read_text())["classes"]


def test_good_videos_are_predicted_and_bad_ones_fail_one_line_each(run, videos, predicted):
    _, predictions, failures, lines = predicted
    assert set(predictions) == GOOD
    for prediction in predictions.values():
        assert sum(prediction.probabilities.values()) == pytest.approx(1.0, abs=1e-5)
        assert list(prediction.probabilities) == classes_of(run)
        assert prediction.predicted == max(prediction.probabilities, key=prediction.probabilities.get)
    assert {f.clip_id for f in failures} == BAD
    for failure in failures:
        assert str(videos / failure.clip_id) in failure.error
        assert sum(failure.clip_id in line and "not predicted" in line for line in lines) == 1
    assert all(any(line.startswith(f"{clip_id}: ") for line in lines) for clip_id in GOOD)


def test_steps_and_attention_follow_the_training_policy(predicted):
    _, predictions, _, _ = predicted
    coffee, rocket, faceless = predictions["coffee.mp4"], predictions["more/rocket.mp4"], predictions["cat.mp4"]
    # 25 fps sources sampled at the run's 5 fps: 50 frames -> 10 samples, 25 -> 5, 15 -> 3.
    assert (coffee.frames, coffee.frames_with_face) == (10, 10)
    assert (rocket.frames, rocket.frames_with_face) == (5, 5)
    assert coffee.attention.shape == (10, 10) and rocket.attention.shape == (5, 5)
    np.testing.assert_allclose(coffee.attention.sum(axis=1), 1.0, atol=1e-5)
    # A clip without any face is still predicted, from all its frames.
    assert (faceless.frames, faceless.frames_with_face) == (3, 0) and faceless.attention.shape == (3, 3)


def test_the_csv_holds_one_row_per_prediction(run, predicted):
    out, predictions, _, _ = predicted
    table = pd.read_csv(out / "predictions.csv", keep_default_na=False)
    classes = classes_of(run)
    probabilities = [f"p_{name}" for name in classes]
    assert list(table.columns) == ["clip_id", "path", "predicted", *probabilities, "frames", "frames_with_face"]
    assert set(table["clip_id"]) == GOOD
    for row in table.itertuples(index=False):
        prediction = predictions[row.clip_id]
        assert (row.path, row.predicted, row.frames) == (prediction.path, prediction.predicted, prediction.frames)
        expected = [prediction.probabilities[name] for name in classes]
        np.testing.assert_allclose([getattr(row, column) for column in probabilities], expected, rtol=1e-6)


def test_one_readable_picture_per_predicted_clip(predicted):
    out, _, _, _ = predicted
    pictures = sorted(p.relative_to(out / "explain").as_posix() for p in (out / "explain").rglob("*.png"))
    assert pictures == sorted(f"{clip_id}.png" for clip_id in GOOD)
    for picture in pictures:
        with Image.open(out / "explain" / picture) as image:
            assert image.format == "PNG" and 1000 <= image.width <= 2400 and 600 <= image.height <= 1600


def audio_columns(picture: np.ndarray, figure, timestamps: np.ndarray) -> np.ndarray:
    """(T, height, 3): the pixels of `picture` (drawn from `figure`) down the middle of each sampled frame's column
    of the audio strip, placed by the strip's own time axis."""
    (axes,) = [axes for axes in figure.get_axes() if axes.get_title().startswith("Audio")]
    box = axes.get_window_extent()
    top, bottom = picture.shape[0] - int(box.y1) + 2, picture.shape[0] - int(box.y0) - 2  # display y grows upwards
    xs = axes.transData.transform(np.stack([timestamps, np.zeros_like(timestamps)], axis=1))[:, 0]
    return np.stack([picture[top:bottom, int(x)] for x in xs])


def test_the_pictures_show_the_audio_on_the_clips_time_and_frames_without_it_grey(predicted, explained):
    """The picture written for each clip is the figure `explanation` draws from the same values: its audio strip is
    found by its own time axis, and the burst's frame must be its brightest column."""
    out = predicted[0]
    for name in ("coffee.mp4.png", "cat.mp4.png"):
        args, kwargs = explained[name]
        clip = kwargs["clip"]
        assert kwargs["audio_bands"] == 64 and clip.audio.shape == (len(clip.timestamps), 128)
        figure = explanation(*args, Voice.of(clip, kwargs["audio_bands"]))
        figure.canvas.draw()
        with Image.open(out / "explain" / name) as image:
            picture = np.asarray(image.convert("RGB"))
        assert picture.shape[:2] == np.asarray(figure.canvas.buffer_rgba()).shape[:2]
        columns = audio_columns(picture, figure, clip.timestamps)
        grey = (np.abs(columns.astype(int) - NO_AUDIO_COLOUR) <= 2).all(axis=(1, 2))
        np.testing.assert_array_equal(grey, ~clip.has_audio)
        if name == "cat.mp4.png":
            assert clip.audio_track.note == "no audio track" and not clip.has_audio.any()
            continue
        stamps = clip.timestamps
        assert clip.audio_track.codec == "aac" and list(clip.has_audio) == list(stamps > AUDIO_START - 0.05)
        inside, away = burst_frames(stamps, 0.2, BURST)
        lit = brightness(columns)
        assert inside.sum() == 1 and (away & clip.has_audio).sum() >= 5
        assert lit[inside].min() > lit[away & clip.has_audio].max(), lit


def assert_predict_equals_evaluate(predictions: list[Prediction], run: Path) -> None:
    """Each video's probabilities equal those `evaluate` gives its extracted features, for every clip of both splits."""
    evaluated = {}
    for split, clip_ids in DATASET_IDS.items():
        evaluate_run(run, split, device="cpu")
        table = pd.read_csv(run / f"eval-{split}" / "predictions.csv").set_index("clip_id")
        assert set(table.index) == clip_ids
        evaluated.update({clip_id: table.loc[clip_id] for clip_id in clip_ids})
    assert sorted(p.clip_id for p in predictions) == sorted(evaluated)
    for prediction in predictions:
        expected = evaluated[prediction.clip_id][[f"p_{c}" for c in prediction.probabilities]].to_numpy(float)
        np.testing.assert_allclose(list(prediction.probabilities.values()), expected, atol=1e-4)


def test_predictions_equal_evaluate_on_the_extracted_features(run, dataset):
    predictions, failures = predict_videos(run, [dataset / "m.csv"], device="cpu", log=quiet)
    assert not failures
    assert_predict_equals_evaluate(predictions, run)


def test_an_ensemble_with_c3d_predicts_videos_as_evaluate_scores_their_features(run, dataset):
    c3d = TrainConfig("c3d", features=dataset / "features", out=dataset / "c3d", epochs=1, device="cpu")
    train_model(c3d, **QUIET)
    ensemble = fit_ensemble([run, c3d.run_folder], "val", out=dataset / "ensemble", device="cpu")
    predictions, failures = predict_videos(ensemble, [dataset / "m.csv"], device="cpu", log=quiet)
    assert not failures and all(p.attention is None for p in predictions)
    assert_predict_equals_evaluate(predictions, ensemble)


def test_a_run_made_with_other_detector_weights_is_refused(run, videos, tmp_path):
    copy = shutil.copytree(run, tmp_path / "run")
    checkpoint = torch.load(copy / "best.pt", weights_only=True)
    checkpoint["attrs"]["detector_weights_sha256"] = "0" * 64
    torch.save(checkpoint, copy / "best.pt")
    named = r"weight retinaface-mobilenet0\.25 here has sha256 [0-9a-f]{64}, the run's .* 0{64}"
    with pytest.raises(PredictError, match=named) as refused:
        predict_videos(copy, [videos], device="cpu", log=quiet)
    assert "\n" not in str(refused.value)


def test_a_folder_that_is_not_a_finished_run_is_refused(videos, tmp_path):
    with pytest.raises(PredictError, match="not a finished training run"):
        predict_videos(tmp_path, [videos], device="cpu", log=quiet)


def test_collect_videos_from_folders_files_and_manifests(tmp_path):
    for rel in ("a/x.mp4", "b/x.mp4", "b/deep/y.MKV", "b/notes.txt", "b/.hidden.mp4"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    entries = collect_videos([tmp_path / "a", tmp_path / "b", tmp_path / "a" / "x.mp4"])
    assert [e.clip_id for e in entries] == ["a/x.mp4", "b/deep/y.MKV", "b/x.mp4"], "x.mp4 twice: below the common folder"
    elsewhere = tmp_path / "elsewhere" / "deeper" / "z.mp4"
    elsewhere.parent.mkdir(parents=True)
    elsewhere.write_bytes(b"x")
    assert [e.clip_id for e in collect_videos([tmp_path / "b", elsewhere])] == ["deep/y.MKV", "x.mp4", "z.mp4"]
    assert all(e.path.is_absolute() and e.label is None for e in entries)
    manifest = tmp_path / "clips.csv"
    manifest.write_text("clip_id,path,label,split\none,a/x.mp4,happy,test\ntwo,missing.mp4,,test\n")
    from_manifest = collect_videos([manifest])
    assert [(e.clip_id, e.label) for e in from_manifest] == [("one", "happy"), ("two", None)]
    with pytest.raises(PredictError, match="no videos found"):
        collect_videos([tmp_path / "b" / "notes-folder-missing", tmp_path / "empty.mp4"])


def test_at_most_eight_frames_are_shown_evenly_from_first_to_last():
    assert frames_to_show(3) == [0, 1, 2]
    assert frames_to_show(50) == [0, 7, 14, 21, 28, 35, 42, 49]


def test_a_model_without_attention_says_so_in_its_picture(videos, tmp_path):
    classes = ["happy", "sad"]
    prediction = Prediction("cat.mp4", str(videos / "cat.mp4"), "sad", {"happy": 0.3, "sad": 0.7}, 3, 0, None)
    shown = thumbnails(videos / "cat.mp4", 5.0, 3)
    assert [t.index for t in shown] == [0, 1, 2] and max(max(t.image.shape[:2]) for t in shown) <= THUMBNAIL_SIDE
    boxes = np.full((3, 4), np.nan, np.float32)
    picture = explain_clip(tmp_path / "face.png", shown, np.arange(3) * 0.2, boxes, prediction, classes, "face", None,
                           np.arange(3))
    with Image.open(picture) as image:
        assert image.format == "PNG"
    # Without features that hear (clip=None), nothing of audio.
    figure = explanation(shown, np.arange(3) * 0.2, boxes, prediction, classes, "face", None, np.arange(3))
    assert not any("Audio" in axes.get_title() for axes in figure.get_axes())


def test_the_pictures_say_which_frames_the_model_used(videos):
    """A model that sees uses the frames with a face; `audio` every frame (train/data.py's policy)."""
    prediction = Prediction("cat.mp4", str(videos / "cat.mp4"), "sad", {"happy": 0.3, "sad": 0.7}, 3, 2, None)
    shown = thumbnails(videos / "cat.mp4", 5.0, 3)
    boxes = np.array([[1, 1, 9, 9], [np.nan] * 4, [2, 2, 9, 9]], np.float32)
    for inputs, used in [(("face", "context"), "face found in 2; the model saw only those"),
                         (("audio", "has_audio"), "face found in 2; the model used every frame"),
                         (("face", "audio", "has_audio", "has_face"), "face found in 2; the model used every frame")]:
        figure = explanation(shown, np.arange(3) * 0.2, boxes, prediction, ["happy", "sad"], "m", None,
                             step_frames(np.array([True, False, True]), inputs))
        assert used in " ".join(sub.get_suptitle() for sub in figure.subfigs), inputs
    faceless = explanation(shown, np.arange(3) * 0.2, np.full((3, 4), np.nan, np.float32), prediction,
                           ["happy", "sad"], "m", None, step_frames(np.zeros(3, bool), ("face",)))
    assert any("NO FACE FOUND in any frame: the model used every frame" in sub.get_suptitle()
               for sub in faceless.subfigs)


def test_the_predict_command_reports_each_clip_and_exits_3_when_some_failed(run, videos, tmp_path):
    done = subprocess.run(
        [sys.executable, "cli.py", "predict", "--run", str(run), "--device", "cpu", "--out", str(tmp_path / "p.csv"),
         str(videos)],
        cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True,
    )
    assert done.returncode == 3, done.stderr
    assert "3 clips predicted, 2 failed" in done.stdout and "empty.mp4" in done.stdout
    assert "Traceback" not in done.stderr and (tmp_path / "p.csv").exists()


def test_an_extreme_frame_shape_is_predicted_and_an_error_in_one_clip_fails_only_it(run, videos, tmp_path,
                                                                                  monkeypatch):
    strip = np.broadcast_to(np.linspace(0, 255, 10000).astype(np.uint8)[None, :, None], (2, 10000, 3))
    write_clip(tmp_path / "strip.mp4", [strip.copy()] * 5, pix_fmt="yuv444p")
    write_clip(tmp_path / "grey.mp4", [np.full((360, 640, 3), 128, np.uint8)] * 5)
    real_detect = RetinaFaceDetector.detect

    def detect(detector, frames):
        """The real detector, raising as a broken library might on the grey clip's frames."""
        if torch.as_tensor(frames).float().std() < 1.0:
            raise RuntimeError("poisoned")
        return real_detect(detector, frames)

    monkeypatch.setattr(RetinaFaceDetector, "detect", detect)
    inputs = [str(videos / "coffee.mp4"), str(tmp_path / "strip.mp4"), str(tmp_path / "grey.mp4")]
    done = CliRunner().invoke(cli_module.cli, ["predict", "--run", str(run), "--device", "cpu",
                                               "--out", str(tmp_path / "p.csv"),
                                               "--explain", str(tmp_path / "pictures"), "--quiet", *inputs])
    assert done.exit_code == 3, done.output
    assert "2 clips predicted, 1 failed" in done.output
    assert [line for line in done.output.splitlines() if "grey.mp4" in line] == [
        "grey.mp4: not predicted: RuntimeError: poisoned"]
    assert sorted(p.name for p in (tmp_path / "pictures").glob("*.png")) == ["coffee.mp4.png", "strip.mp4.png"]


def test_pictures_of_crafted_clip_ids_stay_in_the_folder_and_never_collide(run, videos, tmp_path):
    crafted = ["../../escaped", str(tmp_path / "absolute"), "sub/../../up", "Same", "same", "line\nbreak", "=formula"]
    manifest = tmp_path / "clips.csv"
    pd.DataFrame({"clip_id": crafted, "path": [str(videos / "cat.mp4")] * len(crafted), "label": "",
                  "split": "test"}).to_csv(manifest, index=False)
    pictures = tmp_path / "deep" / "pictures"
    predictions, failures = predict_videos(run, [manifest], device="cpu", explain_dir=pictures,
                                           out_csv=tmp_path / "p.csv", log=quiet)
    assert failures == [] and sorted(p.clip_id for p in predictions) == sorted(crafted)
    written = sorted(path for path in tmp_path.rglob("*.png"))
    assert all(path.is_relative_to(pictures) for path in written)
    assert len({str(path).casefold() for path in written}) == len(crafted), "one picture each, whatever the case"
    cells = pd.read_csv(tmp_path / "p.csv", dtype=str, keep_default_na=False)["clip_id"]
    assert "'=formula" in set(cells) and not any(cell.startswith("=") for cell in cells)


def test_a_picture_that_cannot_be_made_fails_its_clip_and_the_rest_go_on(run, videos, tmp_path, monkeypatch):
    real_thumbnails = predict_module.thumbnails

    def thumbnails(video, fps, count):
        if video.name == "cat.mp4":
            raise VideoError(f"{video}: decoding failed after 3 frames (changed since it was read?)")
        return real_thumbnails(video, fps, count)

    monkeypatch.setattr(predict_module, "thumbnails", thumbnails)
    lines = []
    predictions, failures = predict_videos(run, [videos / "cat.mp4", videos / "coffee.mp4"], device="cpu",
                                           explain_dir=tmp_path / "pictures", log=lines.append)
    assert sorted(p.clip_id for p in predictions) == ["cat.mp4", "coffee.mp4"]
    assert [(f.clip_id, f.stage) for f in failures] == [("cat.mp4", "explain")]
    assert sum("cat.mp4: picture not written" in line for line in lines) == 1
    assert sorted(p.name for p in (tmp_path / "pictures").glob("*.png")) == ["coffee.mp4.png"]
