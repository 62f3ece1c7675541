"""Context CNNs: MobileNetV2 with real ImageNet weights; SqueezeNet's shapes with random weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision

from extract.settings import BACKBONES
from extract.context_cnn import CONTEXT_SIZE, IMAGENET_MEAN, IMAGENET_STD, ContextCNN, centre_square, context_crops
from extract.weights import load_state_dict_checked
from tests.media import photo

IMAGENET_CATS = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat


@pytest.fixture(scope="module")
def mobilenet(networks):
    return networks.context_cnn


def test_mobilenet_v2_sees_a_cat_in_chelsea(mobilenet):
    probabilities = mobilenet.classify([photo("chelsea")]).softmax(-1)[0]
    assert int(probabilities.argmax()) in IMAGENET_CATS
    assert float(probabilities[list(IMAGENET_CATS)].sum()) > 0.5


def test_mobilenet_v2_feature_size_is_recorded_not_assumed(mobilenet):
    frames = [photo("chelsea"), photo("coffee")[:300, :450]]
    features = mobilenet.embed(frames)
    assert features.shape == (2, BACKBONES["mobilenet_v2"].feature_dim) == (2, 1280)
    assert features.dtype == torch.float32 and torch.isfinite(features).all()
    assert not torch.allclose(features[0], features[1])


def test_squeezenet_context_feature_is_25088_and_random_weights_say_so():
    cnn = ContextCNN.random_init("squeezenet1_1", seed=0, device="cpu")
    assert not cnn.pretrained and "RANDOM" in cnn.weights_label
    features = cnn.embed(np.stack([photo("rocket")[:400, :600]] * 3))
    assert features.shape == (3, 25088) == (3, cnn.feature_dim)


def test_features_equal_torchvision_with_its_usual_normalisation(mobilenet, weight_path):
    reference = torchvision.models.mobilenet_v2(weights=None)
    load_state_dict_checked(reference, weight_path("mobilenetv2-imagenet"), "MobileNetV2")
    frames = torch.from_numpy(np.stack([photo("chelsea")[:300, :400], photo("astronaut")[:300, :400]]))
    squares = context_crops(frames).permute(0, 3, 1, 2).float() / 255
    normalised = torchvision.transforms.functional.normalize(squares, IMAGENET_MEAN, IMAGENET_STD)
    with torch.inference_mode():
        expected = reference.eval().features(normalised).mean(dim=(2, 3))
    torch.testing.assert_close(mobilenet.embed(frames), expected, rtol=1e-4, atol=1e-4)


def test_batches_and_single_frames_agree(mobilenet):
    frames = np.stack([photo("chelsea")] * 5)
    frames[1:] = frames[1:] // 2
    together = mobilenet.embed(frames, batch_size=2)
    alone = torch.cat([mobilenet.embed(frames[i : i + 1]) for i in range(5)])
    torch.testing.assert_close(together, alone, atol=1e-4, rtol=1e-4)


def test_empty_input_gives_an_empty_feature_matrix(mobilenet):
    assert mobilenet.embed(np.zeros((0, 32, 32, 3), np.uint8)).shape == (0, 1280)


def test_centre_square_keeps_the_middle_of_a_wide_frame():
    frame = torch.zeros(1, 3, 100, 300)
    frame[..., 100:200] = 255  # the central 100x100 square is white, the sides black
    out = centre_square(frame, size=CONTEXT_SIZE)
    assert out.shape == (1, 3, CONTEXT_SIZE, CONTEXT_SIZE)
    assert torch.allclose(out, torch.full_like(out, 255))


def test_unknown_backbone_is_named_in_the_error():
    with pytest.raises(ValueError, match="resnet18.*squeezenet1_1"):
        ContextCNN.random_init("resnet18")
