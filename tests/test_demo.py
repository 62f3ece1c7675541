"""The demo's sample set, built small: real videos with real faces and a sound track, a valid manifest, the label rule, determinism.

The full demo (`python cli.py demo`) is not run here: CI runs it through the README's main command.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import av
import numpy as np
import pytest

from demo.check_results import PROMISED_ACCURACY, broken_promises, main
from train.metrics import Metrics
from demo.run import DEMO_SET, MODELS
from demo.sample_set import (
    CLIPS_FOLDER, FACE_GROUPS, FRAME_HEIGHT, FRAME_WIDTH, LABEL_RULE, SCENE_KINDS, SCENES, SOUND_RATE, SPLITS,
    STRIP_WIDTH,
    DemoError, Photo, SampleSetConfig, build_sample_set, label_for, plan_clips,
)
from extract.retinaface import RetinaFaceDetector
from extract.video import sample_frames
from features.labels import CHEAVD_CLASSES
from manifests.manifest import read_manifest

SMALL = SampleSetConfig(clips_per_class={"train": 1, "val": 1}, seconds=(1.0, 1.0))


@pytest.fixture(scope="module")
def small_set(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    build_sample_set(out, SMALL, progress=False)
    return out


def clip_bytes(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted((out / CLIPS_FOLDER).rglob("*.mp4"))}


def test_the_manifest_validates_and_every_label_follows_the_rule(small_set):
    entries = read_manifest(small_set / "manifest.csv")
    assert len(entries) == len(LABEL_RULE) * len(SPLITS)
    assert Counter(e.split for e in entries) == {split: len(LABEL_RULE) for split in SPLITS}
    for entry in entries:
        record = dict(entry.extra)
        assert entry.label in CHEAVD_CLASSES
        assert entry.label == label_for(record["face"], record["scene"])
        assert entry.path.parent.name == entry.label and entry.path.parents[1].name == entry.split


def test_neither_the_face_nor_the_scene_alone_gives_the_label():
    assert len(set(LABEL_RULE.values())) == len(LABEL_RULE)
    for group in FACE_GROUPS:
        assert len({LABEL_RULE[(group, kind)] for kind in SCENE_KINDS}) == len(SCENE_KINDS)
    for kind in SCENE_KINDS:
        assert len({LABEL_RULE[(group, kind)] for group in FACE_GROUPS}) == len(FACE_GROUPS)


def test_the_demo_set_is_balanced_and_shows_every_face_with_every_scene_kind():
    plans = plan_clips(DEMO_SET)
    for split in SPLITS:
        in_split = [p for p in plans if p.split == split]
        assert set(Counter(p.label for p in in_split).values()) == {DEMO_SET.clips_per_class[split]}
        shown = {(p.face, p.scene) for p in in_split}
        expected = {(f, s) for faces in FACE_GROUPS.values() for f in faces for scenes in SCENE_KINDS.values() for s in scenes}
        assert shown == expected


def test_clips_are_real_videos_with_a_face_beside_the_context_square(small_set, weight_path):
    detector = RetinaFaceDetector("mobilenet0.25", weights_path=weight_path("retinaface-mobilenet0.25"), device="cpu")
    for entry in read_manifest(small_set / "manifest.csv"):
        frames = [sampled.image for sampled in sample_frames(entry.path, fps=5.0)]
        assert len(frames) == 5, entry.clip_id
        assert frames[0].shape == (FRAME_HEIGHT, FRAME_WIDTH, 3)
        assert not np.array_equal(frames[0], frames[-1])  # the scene and the face move
        faces = detector.detect(frames[:1])[0]
        assert len(faces.boxes) >= 1 and faces.scores[0] > 0.9, (entry.clip_id, faces.scores)
        x1, _, x2, _ = faces.boxes[0]
        # The context CNN sees the centre square only, so the face must stay in a side strip.
        assert x2 <= STRIP_WIDTH + 2 or x1 >= FRAME_WIDTH - STRIP_WIDTH - 2, (entry.clip_id, faces.boxes[0])


def test_each_clip_sounds_like_its_kind_of_scene_for_as_long_as_it_shows_it(small_set):
    for entry in read_manifest(small_set / "manifest.csv"):
        with av.open(str(entry.path)) as container:
            video, audio = container.streams.video[0], container.streams.audio[0]
            assert (audio.codec_context.name, audio.rate, audio.channels) == ("aac", SOUND_RATE, 1)
            seconds = float(video.duration * video.time_base)
            samples = np.concatenate([frame.to_ndarray()[0] for frame in container.decode(audio)])
        assert abs(len(samples) / SOUND_RATE - seconds) < 0.1, entry.clip_id  # AAC rounds up to 1024 samples
        spectrum = np.abs(np.fft.rfft(samples))
        loudest = np.fft.rfftfreq(len(samples), 1 / SOUND_RATE)[spectrum.argmax()]
        kind = next(kind for kind, scenes in SCENE_KINDS.items() if dict(entry.extra)["scene"] in scenes)
        # The hum's fundamental is 110-160 Hz; the whistle glides from 900-1300 Hz up an octave (a few Hz of
        # margin: the hum's swell spreads its peak).
        assert (105 <= loudest <= 165) if kind == "home" else (895 <= loudest <= 2605), (entry.clip_id, loudest)


def test_building_is_deterministic(small_set, tmp_path):
    build_sample_set(tmp_path, SMALL, progress=False)
    assert clip_bytes(tmp_path) == clip_bytes(small_set)
    assert (tmp_path / "manifest.csv").read_bytes() == (small_set / "manifest.csv").read_bytes()


def test_a_complete_set_is_kept_and_an_incomplete_one_rebuilt(tmp_path):
    manifest = build_sample_set(tmp_path, SMALL, progress=False)
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    assert build_sample_set(tmp_path, SMALL, progress=False) == manifest
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()} == stamps

    before = clip_bytes(tmp_path)
    next((tmp_path / CLIPS_FOLDER).rglob("*.mp4")).unlink()
    build_sample_set(tmp_path, SMALL, progress=False)
    assert clip_bytes(tmp_path) == before
    read_manifest(manifest)


def test_a_photo_that_is_not_the_expected_file_is_refused():
    cat = SCENES["cat"]
    with pytest.raises(DemoError, match="not the photo the demo was made for"):
        Photo(cat.package, cat.file, "0" * 64).load()


def write_demo_results(out: Path, accuracies: dict[str, float]) -> None:
    for model, accuracy in accuracies.items():
        folder = out / "runs" / model / "eval-val"
        folder.mkdir(parents=True)
        metrics = Metrics(map=accuracy, accuracy=accuracy, per_class_ap={"happy": accuracy}, confusion=[[1]],
                          classes=["happy"], count=1)
        (folder / "metrics.json").write_text(json.dumps(metrics.to_json()))


def test_the_demo_check_holds_the_results_to_the_readmes_promise(tmp_path, capsys):
    assert set(PROMISED_ACCURACY) == set(MODELS)
    write_demo_results(tmp_path / "kept", {"face": 0.5, "context": 0.5, "audio": 0.5, "concat": 1.0, "parallel": 1.0,
                                           "caca": 1.0, "face-audio": 1.0, "caca-av": 1.0})
    assert broken_promises(tmp_path / "kept") == [] and main([str(tmp_path / "kept")]) == 0
    write_demo_results(tmp_path / "missed", {"face": 0.5, "context": 0.5625, "audio": 0.5, "concat": 1.0,
                                             "parallel": 0.9792, "caca": 1.0, "face-audio": 1.0})
    problems = broken_promises(tmp_path / "missed")
    assert [line.split(":")[0] for line in problems] == ["context", "parallel", "caca-av"], problems
    assert "0.5625" in problems[0] and "50%" in problems[0] and "caca-av" in problems[2] and "metrics.json" in problems[2]
    capsys.readouterr()
    assert main([str(tmp_path / "missed")]) == 1
    assert capsys.readouterr().err.count("\n") == 3
