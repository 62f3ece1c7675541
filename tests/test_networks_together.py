"""The three frozen networks together on real photos: detect, crop, read the expression, embed the scene."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops import box_iou

from extract.context_cnn import ContextCNN
from extract.face_cnn import EXPRESSION_CLASSES, FaceCNN
from extract.faces import crop_every_face
from extract.retinaface import RetinaFaceDetector
from tests.media import moving_face, photo


def test_the_smiling_astronaut_is_detected_cropped_and_read_as_happy(weight_path):
    frame = photo("astronaut")
    faces = RetinaFaceDetector(weights_path=weight_path("retinaface-mobilenet0.25"), device="cpu").detect([frame])[0]
    x1, y1, x2, y2 = faces.boxes[0].round().astype(int)
    crop = frame[y1:y2, x1:x2]
    probabilities = FaceCNN(weight_path("mini-xception-fer2013"), device="cpu").expressions(crop[None])[0]
    assert EXPRESSION_CLASSES[int(probabilities.argmax())] == "happy"
    context = ContextCNN("mobilenet_v2", weights_path=weight_path("mobilenetv2-imagenet"), device="cpu")
    assert context.embed(frame[None]).shape == (1, 1280) and np.isfinite(context.embed(frame[None]).numpy()).all()


def test_bfloat16_gives_boxes_and_features_close_to_float32(weight_path):
    """Measured on these frames: box IoU >= 0.97, face cosine >= 0.9998, context cosine >= 0.9989."""
    frames = torch.from_numpy(np.stack(moving_face("coffee", 12, step=20)))
    results = {}
    for precision in ("float32", "bfloat16"):
        detections = RetinaFaceDetector(device="cpu", precision=precision).detect(frames)
        crops = crop_every_face(frames, detections)[0] if precision == "float32" else results["float32"][1]
        results[precision] = (
            detections,
            crops,
            FaceCNN(device="cpu", precision=precision).embed(crops).features,
            ContextCNN("mobilenet_v2", device="cpu", precision=precision).embed(frames),
        )
    (reference, _, face, context), (detections, _, face16, context16) = results["float32"], results["bfloat16"]
    assert [len(d.boxes) for d in detections] == [len(d.boxes) for d in reference] == [1] * len(frames)
    ious = [box_iou(torch.from_numpy(a.boxes), torch.from_numpy(b.boxes)).item() for a, b in zip(reference, detections)]
    assert min(ious) > 0.9
    assert F.cosine_similarity(face, face16, dim=1).min() > 0.999
    assert F.cosine_similarity(context, context16, dim=1).min() > 0.995
    assert not torch.equal(face, face16), "bfloat16 must really compute in bfloat16"
