"""RetinaFace with the real MobileNet-0.25 checkpoint, on real photographs decoded from video."""

from __future__ import annotations

import hashlib
import itertools
import math
import re
import shutil

import numpy as np
import pytest
import torch
import torchvision

from extract import weights
from extract.retinaface import VARIANTS, RetinaFace, RetinaFaceDetector, decode_boxes, decode_landmarks, prior_boxes
from extract.weights import WeightsError, load_state_dict_checked
from tests.cli_runs import run_cli
from tests.media import ASTRONAUT_FACE_BOX, SCENES_WITHOUT_FACES, panned_frames, photo, read_clip, write_clip


def iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


@pytest.fixture(scope="module")
def detector(networks):
    return networks.detector


@pytest.fixture(scope="module")
def astronaut_clip_frames(tmp_path_factory):
    """Six frames of the astronaut panning right 4 px a frame, through a real H.264 encode/decode."""
    path = write_clip(tmp_path_factory.mktemp("clips") / "astronaut.mp4", panned_frames(photo("astronaut"), 6))
    return read_clip(path)


def test_finds_the_astronaut_face_in_every_decoded_frame(detector, astronaut_clip_frames):
    results = detector.detect(astronaut_clip_frames)
    assert len(results) == len(astronaut_clip_frames)
    for i, faces in enumerate(results):
        assert len(faces.boxes) >= 1
        assert faces.scores[0] > 0.9
        expected = np.array(ASTRONAUT_FACE_BOX, dtype=float) + [4 * i, 0, 4 * i, 0]
        assert iou(faces.boxes[0], expected) > 0.7, (faces.boxes[0], expected)
        (left_eye, right_eye, nose, mouth_left, mouth_right) = faces.landmarks[0]
        x1, y1, x2, y2 = faces.boxes[0]
        assert np.all((faces.landmarks[0] >= [x1, y1]) & (faces.landmarks[0] <= [x2, y2]))
        assert left_eye[0] < right_eye[0] and mouth_left[0] < mouth_right[0]
        assert max(left_eye[1], right_eye[1]) < nose[1] < min(mouth_left[1], mouth_right[1])
    # The face moved right 4 px a frame; the boxes follow it.
    centres = [(r.boxes[0][0] + r.boxes[0][2]) / 2 for r in results]
    assert np.allclose(np.diff(centres), 4, atol=2)


@pytest.mark.parametrize("scene", SCENES_WITHOUT_FACES)
def test_finds_nothing_above_threshold_in_photos_without_faces(detector, scene):
    faces = detector.detect([photo(scene)])[0]
    assert len(faces.boxes) == 0, faces.scores
    assert faces.boxes.shape == (0, 4) and faces.landmarks.shape == (0, 5, 2)


def test_a_batch_gives_the_same_detections_as_single_calls(detector, astronaut_clip_frames):
    batched = detector.detect(np.stack(astronaut_clip_frames))
    for frame, together in zip(astronaut_clip_frames, batched):
        alone = detector.detect([frame])[0]
        np.testing.assert_allclose(together.boxes, alone.boxes, atol=1e-3)
        np.testing.assert_allclose(together.scores, alone.scores, atol=1e-5)
        np.testing.assert_allclose(together.landmarks, alone.landmarks, atol=1e-3)


# The published RetinaFace configuration (biubug6's cfg_mnet and cfg_re50), typed here rather
# than imported, so that the reference below shares no code or constant with extract/retinaface.py.
REFERENCE_MIN_SIZES = [[16, 32], [64, 128], [256, 512]]
REFERENCE_STEPS = [8, 16, 32]
REFERENCE_VARIANCES = [0.1, 0.2]
REFERENCE_BGR_MEAN = [104.0, 117.0, 123.0]


def reference_priors(height: int, width: int) -> np.ndarray:
    """biubug6's PriorBox (clip False), in float64: per level, row by row, column by column, each
    min size, an anchor (cx, cy, s_kx, s_ky) relative to the image; feature maps are ceil(side / step)."""
    anchors = []
    for step, min_sizes in zip(REFERENCE_STEPS, REFERENCE_MIN_SIZES):
        for i, j in itertools.product(range(math.ceil(height / step)), range(math.ceil(width / step))):
            for min_size in min_sizes:
                cx, cy = (j + 0.5) * step / width, (i + 0.5) * step / height
                anchors.append([cx, cy, min_size / width, min_size / height])
    return np.array(anchors)


def reference_decode(loc: np.ndarray, priors: np.ndarray) -> np.ndarray:
    """biubug6's decode: centre-size offsets scaled by the variances, to corners (x1, y1, x2, y2)."""
    centres = priors[:, :2] + loc[:, :2] * REFERENCE_VARIANCES[0] * priors[:, 2:]
    sizes = priors[:, 2:] * np.exp(loc[:, 2:] * REFERENCE_VARIANCES[1])
    return np.concatenate([centres - sizes / 2, centres + sizes / 2], axis=1)


def reference_decode_landmarks(pre: np.ndarray, priors: np.ndarray) -> np.ndarray:
    """biubug6's decode_landm: five points, each the prior's centre plus its offset scaled by the first variance."""
    points = [priors[:, :2] + pre[:, 2 * k : 2 * k + 2] * REFERENCE_VARIANCES[0] * priors[:, 2:] for k in range(5)]
    return np.stack(points, axis=1)


def reference_detections(weights_file, frame: np.ndarray, threshold: float = 0.5):
    """The published recipe, one frame, nothing folded or skipped: BGR minus means, softmax, decode
    all anchors with the priors and decoders above (numpy, float64), threshold, NMS 0.4."""
    model = RetinaFace(VARIANTS["mobilenet0.25"])
    load_state_dict_checked(model, weights_file, "RetinaFace")
    bgr = torch.from_numpy(frame[..., ::-1].copy()).permute(2, 0, 1).float()[None]
    with torch.inference_mode():
        offsets, logits, landmark_offsets = model.eval()(bgr - torch.tensor(REFERENCE_BGR_MEAN).view(1, 3, 1, 1))
    height, width = frame.shape[:2]
    priors = reference_priors(height, width)
    scores = logits[0].softmax(-1)[:, 1].numpy()
    boxes = reference_decode(offsets[0].double().numpy(), priors) * [width, height, width, height]
    landmarks = reference_decode_landmarks(landmark_offsets[0].double().numpy(), priors) * [width, height]
    keep = np.flatnonzero(scores > threshold)
    survivors = torchvision.ops.nms(torch.from_numpy(boxes[keep]), torch.from_numpy(scores[keep]).double(), 0.4)
    kept = keep[survivors.numpy()]
    return boxes[kept], scores[kept], landmarks[kept]


def test_detections_equal_the_published_recipe_with_nothing_folded(detector, weight_path, astronaut_clip_frames):
    frames = [*astronaut_clip_frames[:2], photo("astronaut")]
    for frame, found in zip(frames, detector.detect(frames)):
        boxes, scores, landmarks = reference_detections(weight_path("retinaface-mobilenet0.25"), frame)
        assert len(found.boxes) == len(boxes) >= 1
        np.testing.assert_allclose(found.boxes, boxes, atol=0.01)
        np.testing.assert_allclose(found.scores, scores, atol=1e-5)
        np.testing.assert_allclose(found.landmarks, landmarks, atol=0.01)


def test_a_score_threshold_outside_zero_to_one_is_refused(weight_path):
    with pytest.raises(ValueError, match="between 0 and 1"):
        RetinaFaceDetector(weights_path=weight_path("retinaface-mobilenet0.25"), device="cpu", score_threshold=1.0)


def test_empty_batch(detector):
    assert detector.detect(np.zeros((0, 64, 64, 3), np.uint8)) == []


def test_prior_boxes_and_decoders_equal_the_published_definition():
    # 640x640: (80*80 + 40*40 + 20*20) locations x 2 anchors = 16800, as in the reference code.
    assert prior_boxes(640, 640).shape == (16800, 4)
    # Odd sizes round feature maps up.
    assert prior_boxes(100, 150).shape[0] == 2 * (13 * 19 + 7 * 10 + 4 * 5)
    for height, width in [(640, 640), (100, 150), (270, 480), (1, 640), (33, 7)]:
        expected = reference_priors(height, width).astype(np.float32)
        np.testing.assert_array_equal(prior_boxes(height, width).numpy(), expected)
    priors = reference_priors(270, 480)
    offsets = np.random.default_rng(0).normal(0, 2, (len(priors), 14))
    as_tensors = torch.from_numpy(offsets).float(), torch.from_numpy(priors).float()
    np.testing.assert_allclose(decode_boxes(as_tensors[0][:, :4], as_tensors[1]).numpy(),
                               reference_decode(offsets[:, :4], priors), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(decode_landmarks(as_tensors[0][:, 4:], as_tensors[1]).numpy(),
                               reference_decode_landmarks(offsets[:, 4:], priors), rtol=1e-5, atol=1e-6)


def test_checkpoint_with_module_prefix_loads_the_same(detector, weight_path, tmp_path, astronaut_clip_frames):
    state = torch.load(weight_path("retinaface-mobilenet0.25"), map_location="cpu", weights_only=True)
    prefixed = tmp_path / "dataparallel.pth"
    torch.save({f"module.{k}": v for k, v in state.items()}, prefixed)
    other = RetinaFaceDetector("mobilenet0.25", weights_path=prefixed, device="cpu")
    a, b = detector.detect(astronaut_clip_frames[:1])[0], other.detect(astronaut_clip_frames[:1])[0]
    np.testing.assert_array_equal(a.boxes, b.boxes)


@pytest.fixture(scope="module")
def resnet50_retinaface() -> RetinaFace:
    """RetinaFace with the ResNet-50 backbone and random weights: no published file is reachable offline."""
    return RetinaFace(VARIANTS["resnet50"]).eval()


def test_resnet50_variant_uses_the_checkpoint_names_of_the_published_models(weight_path, resnet50_retinaface):
    """No ResNet-50 file is reachable offline, so check its layout against the real MobileNet file:
    outside the backbone every tensor name is the same, and the backbone is torchvision's ResNet-50."""
    real = torch.load(weight_path("retinaface-mobilenet0.25"), map_location="cpu", weights_only=True)
    resnet_keys = set(resnet50_retinaface.state_dict())
    heads = lambda keys: {k for k in keys if not k.startswith("body.")}  # noqa: E731
    assert heads(resnet_keys) == heads(real)
    assert "body.layer4.2.conv3.weight" in resnet_keys and "body.fc.weight" not in resnet_keys
    with torch.inference_mode():
        boxes, logits, landmarks = resnet50_retinaface(torch.zeros(1, 3, 64, 96))
    anchors = prior_boxes(64, 96).shape[0]
    assert boxes.shape == (1, anchors, 4) and logits.shape == (1, anchors, 2) and landmarks.shape == (1, anchors, 10)


def test_a_resnet50_file_is_listed_unpinned_with_its_hash_and_loaded_strictly(
    resnet50_retinaface, weight_path, tmp_path, monkeypatch
):
    """README, "Unpinned": no sha256 is published for the ResNet-50 file, so `weights list` shows it
    as UNPINNED with the hash of the file there, and using it loads it strictly. The file here holds
    the network's own random weights, under the registry's file name: it is taken from the cache and
    loads; then another model's file in its place is listed the same but refused by the detector."""
    spec = weights.REGISTRY["retinaface-resnet50"]
    cached = tmp_path / spec.filename

    def listed() -> list[str]:
        status, out, err = run_cli("weights", "list", "--cache-dir", tmp_path)
        assert status == 0, err
        lines = out.splitlines()
        first = next(i for i, line in enumerate(lines) if line.startswith(f"{spec.name} "))
        return lines[first : first + 4]

    entry = listed()
    assert entry[0].split() == [spec.name, "MISSING", str(cached)]
    assert entry[2].endswith("size not published, sha256 not pinned (no published hash)")
    torch.save(resnet50_retinaface.state_dict(), cached)
    entry = listed()
    assert entry[0].split() == [spec.name, "UNPINNED", str(cached)]
    digest = hashlib.sha256(cached.read_bytes()).hexdigest()
    assert entry[2].endswith(f"sha256 not pinned (no published hash); file on disk has {digest}")
    load_state_dict_checked(resnet50_retinaface, weights.verified_path(spec.name, tmp_path), "RetinaFace-resnet50")
    shutil.copyfile(weight_path("retinaface-mobilenet0.25"), cached)
    assert listed()[0].split()[:2] == [spec.name, "UNPINNED"]  # listing reads the hash, not the tensors
    monkeypatch.setenv(weights.CACHE_ENV, str(tmp_path))
    with pytest.raises(WeightsError, match=re.escape(f"{cached} does not fit RetinaFace-resnet50")):
        RetinaFaceDetector("resnet50", device="cpu")


def test_a_checkpoint_of_another_model_is_refused_naming_the_file(weight_path):
    other = weight_path("mobilenetv2-imagenet")
    with pytest.raises(WeightsError, match=str(other)):
        RetinaFaceDetector("mobilenet0.25", weights_path=other, device="cpu")
