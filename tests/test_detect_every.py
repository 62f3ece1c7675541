"""extract --detect-every K: full detection on every K-th sampled frame, tracking between, on real pixels."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from extract.embed import Networks
from extract.faces import TRACK_REGION_SIZE, choose_main_face, crop_every_face, detect_downscaled
from extract.clips import embed_clips, recipe_of
from extract.pipeline import extract_split
from extract.settings import ExtractError, ExtractSettings
from extract.retinaface import RetinaFaceDetector
from extract.video import sample_frames
from features.reader import open_features, write_index
from features.recipe import FeatureRecipe
from features.schema import comparable, shard_files
from features.tools import validate
from manifests.manifest import ClipEntry, write_manifest
from predict.predict import extraction_recipe
from tests.cli_runs import one_line_error, run_cli
from tests.conftest import QUIET
from tests.media import moving_face, photo, write_clip


class Recording:
    """The real detector, keeping a copy of every batch of frames it is given (counting, not faking)."""

    def __init__(self, detector: RetinaFaceDetector):
        self.detector = detector
        self.batches: list[torch.Tensor] = []

    def __getattr__(self, name):
        return getattr(self.detector, name)

    def detect(self, frames):
        self.batches.append(torch.as_tensor(frames).clone())
        return self.detector.detect(frames)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clips")
    return [
        ClipEntry("coffee", write_clip(folder / "coffee.mp4", moving_face("coffee", frames=50)), "happy", "train"),
        ClipEntry("rocket", write_clip(folder / "rocket.mp4", moving_face("rocket", frames=40, step=6)), "happy", "train"),
    ]


def extracted(clips, networks, every: int, batch_size: int = 4) -> list:
    settings = ExtractSettings("train", context_backbone="mobilenet_v2", device="cpu", batch_size=batch_size,
                               detect_every=every)
    return list(embed_clips(clips, networks, recipe_of(settings), batch_size))


def sampled(path: Path) -> torch.Tensor:
    return torch.from_numpy(np.stack([f.image for f in sample_frames(path)]))


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    width = np.clip(np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]), 0, None)
    height = np.clip(np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]), 0, None)
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])  # noqa: E731
    return width * height / (area(a) + area(b) - width * height)


def test_every_frame_a_keyframe_gives_exactly_the_detect_every_frame_arrays(clips, networks):
    """K=1 is the paper's protocol, bit for bit: full detection on every frame, nothing tracked."""
    got = extracted(clips[:1], networks, every=1, batch_size=64)[0]
    frames = sampled(clips[0].path)
    found = detect_downscaled(networks.detector, frames)
    choice = choose_main_face(found, float(frames.shape[1] * frames.shape[2]))
    crops, owners = crop_every_face(frames, found)
    features = networks.face_cnn.embed(crops).features.numpy()
    first = np.cumsum([0] + [len(d.boxes) for d in found])
    assert None not in choice
    np.testing.assert_array_equal(got.has_face, np.ones(len(frames), bool))
    np.testing.assert_array_equal(got.box, np.stack([d.boxes[c] for d, c in zip(found, choice)]))
    np.testing.assert_array_equal(got.score, np.array([d.scores[c] for d, c in zip(found, choice)]))
    np.testing.assert_array_equal(got.landmarks, np.stack([d.landmarks[c] for d, c in zip(found, choice)]))
    np.testing.assert_array_equal(got.face, features[first[:-1] + np.array(choice)])


def test_k3_detects_exactly_the_keyframes_of_each_clip_and_tracks_the_face_between(clips, networks):
    reference = extracted(clips, networks, every=1)
    recording = Recording(networks.detector)
    tracked = extracted(clips, Networks(recording, networks.face_cnn, networks.context_cnn), every=3)
    full = [b for b in recording.batches if b.shape[1:3] != (TRACK_REGION_SIZE, TRACK_REGION_SIZE)]
    # Keyframes are counted per clip (0, 3, 6, 9 of 10 and 0, 3, 6 of 8), across windows of 4 frames.
    keyframes = [sampled(c.path)[::3] for c in clips]
    assert [len(k) for k in keyframes] == [4, 3]
    given, expected = [f for b in full for f in b], [f for k in keyframes for f in k]
    assert len(given) == len(expected) and all(torch.equal(a, b) for a, b in zip(given, expected))
    regions = [b for b in recording.batches if b.shape[1:3] == (TRACK_REGION_SIZE, TRACK_REGION_SIZE)]
    assert len(regions) == (10 - 4) + (8 - 3), "one call per frame between keyframes, its faces' regions together"
    for ref, got in zip(reference, tracked):
        assert ref.has_face.all() and got.has_face.all()
        between = np.arange(len(ref.box)) % 3 != 0
        overlap = iou(ref.box[between], got.box[between])
        assert overlap.min() > 0.8, overlap
        assert (got.score[between] > 0.9).all(), "real detections, with the detector's own scores"


def test_a_face_that_leaves_between_keyframes_is_dropped_not_held(networks, tmp_path):
    # 25 fps sampled at 5: the face is in sample 0 only, then the scene alone.
    frames = moving_face("coffee", frames=5) + [photo("coffee")] * 20
    clip = ClipEntry("leaves", write_clip(tmp_path / "leaves.mp4", frames), "happy", "train")
    recording = Recording(networks.detector)
    got = extracted([clip], Networks(recording, networks.face_cnn, networks.context_cnn), every=3)[0]
    assert got.has_face.tolist() == [True, False, False, False, False]
    assert not got.face[1:].any() and np.isnan(got.box[1:]).all()
    assert recording.batches[1].shape == (1, TRACK_REGION_SIZE, TRACK_REGION_SIZE, 3), "sample 1 was looked at"


@pytest.fixture(scope="module")
def manifest(clips, tmp_path_factory):
    path = tmp_path_factory.mktemp("manifest") / "m.csv"
    write_manifest(clips[1:], path)
    return path


def extract_with(manifest: Path, out: Path, every: int):
    settings = ExtractSettings("train", manifest=manifest, out=out, context_backbone="mobilenet_v2", device="cpu",
                               detect_every=every)
    return extract_split(settings, **QUIET)


def test_detect_every_0_is_a_usage_error(manifest, tmp_path):
    status, _, stderr = run_cli("extract", "--manifest", manifest, "--split", "train", "--out", tmp_path,
                                "--detect-every", "0")
    assert status == 2 and "Invalid value for '--detect-every'" in stderr


def test_shards_made_with_k3_are_refused_when_resumed_with_k1(manifest, tmp_path, weight_path):
    assert extract_with(manifest, tmp_path, 3).done == 1
    one_line_error(*run_cli("extract", "--manifest", manifest, "--split", "train", "--out", tmp_path,
                            "--context-backbone", "mobilenet_v2", "--device", "cpu", "--quiet")[::2],
                   "detect_every: 3 != 1")


def forget_detect_every(folder: Path) -> None:
    """Make the folder's shards look written before the setting existed (and before the content hash)."""
    for shard in shard_files(folder):
        with h5py.File(shard, "a") as handle:
            del handle.attrs["detect_every"]
            del handle.attrs["content_sha256"]
    write_index(folder)


def test_shards_older_than_the_setting_count_as_k1(manifest, tmp_path):
    assert extract_with(manifest, tmp_path, 1).done == 1
    forget_detect_every(tmp_path / "train")
    assert validate(tmp_path / "train") == []
    assert extract_with(manifest, tmp_path, 1).skipped == 1
    with pytest.raises(ExtractError, match=r"detect_every: 1 != 3"):
        extract_with(manifest, tmp_path, 3)
    with open_features(tmp_path / "train") as old:
        assert "detect_every" not in old.attrs
        assert comparable(old.attrs, {**old.attrs, "detect_every": 1}) == []


@pytest.mark.parametrize("every", [3, None])
def test_predict_extracts_with_the_runs_k(manifest, tmp_path, every):
    extract_with(manifest, tmp_path / "features", every or 1)
    if every is None:
        forget_detect_every(tmp_path / "features" / "train")
    with open_features(tmp_path / "features" / "train") as features:
        attrs = features.attrs
    assert extraction_recipe(tmp_path / "run", FeatureRecipe.from_attrs(attrs)).detect_every == (every or 1)
