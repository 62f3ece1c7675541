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
from tests.media import heads_on_scene, photo


def test_the_smiling_astronaut_is_detected_cropped_and_read_as_happy(networks):
    frame = photo("astronaut")
    faces = networks.detector.detect([frame])[0]
    x1, y1, x2, y2 = faces.boxes[0].round().astype(int)
    crop = frame[y1:y2, x1:x2]
    probabilities = networks.face_cnn.expressions(crop[None])[0]
    assert EXPRESSION_CLASSES[int(probabilities.argmax())] == "happy"
    context = networks.context_cnn.embed(frame[None])
    assert context.shape == (1, 1280) and np.isfinite(context.numpy()).all()


# Real faces from 64 to 200 px on real scenes (480x270), two or three a frame: (scene, heads).
PRECISION_FRAMES = [
    ("coffee", [("eileen_collins", 30, 20, 128), ("cameraman", 300, 150, 96), ("grace_hopper", 380, 10, 64)]),
    ("rocket", [("grace_hopper", 40, 120, 140), ("eileen_collins", 300, 30, 72), ("cameraman", 360, 150, 110)]),
    ("chelsea", [("cameraman", 20, 10, 160), ("grace_hopper", 330, 160, 80), ("eileen_collins", 250, 10, 100)]),
    ("coffee", [("grace_hopper", 150, 40, 200), ("eileen_collins", 400, 200, 64)]),
]


def test_bfloat16_gives_boxes_and_features_within_the_documented_bounds_of_float32(networks):
    """README: bfloat16 "gives box IoU >= 0.97 and feature cosines >= 0.998 against float32".

    Measured on these frames: box IoU >= 0.990, face cosine >= 0.9997, context cosine >= 0.9986.
    """
    frames = torch.from_numpy(np.stack([heads_on_scene(scene, (270, 480), heads) for scene, heads in PRECISION_FRAMES]))
    reference = networks.detector.detect(frames)
    detections = RetinaFaceDetector(device="cpu", precision="bfloat16").detect(frames)
    planted = [len(heads) for _, heads in PRECISION_FRAMES]
    assert [len(d.boxes) for d in detections] == [len(d.boxes) for d in reference] == planted
    best_match = [box_iou(torch.from_numpy(a.boxes), torch.from_numpy(b.boxes)).max(dim=1).values
                  for a, b in zip(reference, detections)]
    assert torch.cat(best_match).min() >= 0.97
    crops = crop_every_face(frames, reference)[0]
    face = networks.face_cnn.embed(crops).features
    face16 = FaceCNN(device="cpu", precision="bfloat16").embed(crops).features
    context = networks.context_cnn.embed(frames)
    context16 = ContextCNN("mobilenet_v2", device="cpu", precision="bfloat16").embed(frames)
    assert F.cosine_similarity(face, face16, dim=1).min() >= 0.998
    assert F.cosine_similarity(context, context16, dim=1).min() >= 0.998
    assert not torch.equal(face, face16), "bfloat16 must really compute in bfloat16"
