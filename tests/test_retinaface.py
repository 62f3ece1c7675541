"""RetinaFace with the real MobileNet-0.25 checkpoint, on real photographs decoded from video."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision

from extract.retinaface import (
    BGR_MEAN, VARIANTS, RetinaFace, RetinaFaceDetector, decode_boxes, decode_landmarks, prior_boxes,
)
from extract.weights import load_state_dict_checked
from extract.weights import WeightsError
from tests.media import ASTRONAUT_FACE_BOX, SCENES_WITHOUT_FACES, panned_frames, photo, read_clip, write_clip


def iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


@pytest.fixture(scope="module")
def detector(weight_path):
    return RetinaFaceDetector("mobilenet0.25", weights_path=weight_path("retinaface-mobilenet0.25"), device="cpu")


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


def reference_detections(weights, frame: np.ndarray, threshold: float = 0.5):
    """The published recipe, one frame, nothing folded or skipped: BGR minus means, softmax, decode all, NMS."""
    model = RetinaFace(VARIANTS["mobilenet0.25"])
    load_state_dict_checked(model, weights, "RetinaFace")
    bgr = torch.from_numpy(frame[..., ::-1].copy()).permute(2, 0, 1).float()[None]
    with torch.inference_mode():
        offsets, logits, landmark_offsets = model.eval()(bgr - torch.tensor(BGR_MEAN).view(1, 3, 1, 1))
    priors, scale = prior_boxes(*frame.shape[:2]), torch.tensor([frame.shape[1], frame.shape[0]])
    scores = logits[0].softmax(-1)[:, 1]
    boxes = decode_boxes(offsets[0], priors) * scale.repeat(2)
    landmarks = decode_landmarks(landmark_offsets[0], priors) * scale
    keep = torch.nonzero(scores > threshold).flatten()
    kept = keep[torchvision.ops.nms(boxes[keep], scores[keep], 0.4)]
    return boxes[kept].numpy(), scores[kept].numpy(), landmarks[kept].numpy()


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


def test_prior_boxes_match_the_published_anchor_count():
    # 640x640: (80*80 + 40*40 + 20*20) locations x 2 anchors = 16800, as in the reference code.
    priors = prior_boxes(640, 640)
    assert priors.shape == (16800, 4)
    assert torch.allclose(priors[0], torch.tensor([4 / 640, 4 / 640, 16 / 640, 16 / 640]))
    # Odd sizes round feature maps up.
    assert prior_boxes(100, 150).shape[0] == 2 * (13 * 19 + 7 * 10 + 4 * 5)


def test_checkpoint_with_module_prefix_loads_the_same(detector, weight_path, tmp_path, astronaut_clip_frames):
    state = torch.load(weight_path("retinaface-mobilenet0.25"), map_location="cpu", weights_only=True)
    prefixed = tmp_path / "dataparallel.pth"
    torch.save({f"module.{k}": v for k, v in state.items()}, prefixed)
    other = RetinaFaceDetector("mobilenet0.25", weights_path=prefixed, device="cpu")
    a, b = detector.detect(astronaut_clip_frames[:1])[0], other.detect(astronaut_clip_frames[:1])[0]
    np.testing.assert_array_equal(a.boxes, b.boxes)


def test_resnet50_variant_uses_the_checkpoint_names_of_the_published_models(weight_path):
    """No ResNet-50 file is reachable offline, so check its layout against the real MobileNet file:
    outside the backbone every tensor name is the same, and the backbone is torchvision's ResNet-50."""
    real = torch.load(weight_path("retinaface-mobilenet0.25"), map_location="cpu", weights_only=True)
    resnet_keys = set(RetinaFace(VARIANTS["resnet50"]).state_dict())
    heads = lambda keys: {k for k in keys if not k.startswith("body.")}  # noqa: E731
    assert heads(resnet_keys) == heads(real)
    assert "body.layer4.2.conv3.weight" in resnet_keys and "body.fc.weight" not in resnet_keys
    boxes, logits, landmarks = RetinaFace(VARIANTS["resnet50"]).eval()(torch.zeros(1, 3, 64, 96))
    anchors = prior_boxes(64, 96).shape[0]
    assert boxes.shape == (1, anchors, 4) and logits.shape == (1, anchors, 2) and landmarks.shape == (1, anchors, 10)


def test_a_checkpoint_of_another_model_is_refused_naming_the_file(weight_path):
    other = weight_path("mobilenetv2-imagenet")
    with pytest.raises(WeightsError, match=str(other)):
        RetinaFaceDetector("mobilenet0.25", weights_path=other, device="cpu")
