"""Small real-pixel clips for tests, made with PyAV from scikit-image's public-domain photos."""

from __future__ import annotations

from fractions import Fraction
from functools import lru_cache
from pathlib import Path

import av
import numpy as np
import skimage.data
from PIL import Image

from demo.sample_set import FACES

# Hand-annotated from the photo: Eileen Collins' face, forehead to chin (x1, y1, x2, y2).
ASTRONAUT_FACE_BOX = (180, 65, 268, 175)
SCENES_WITHOUT_FACES = ("chelsea", "coffee", "rocket")
HEAD = (slice(20, 220), slice(120, 320))  # rows, cols of the astronaut photo around her head
# The demo's head squares (demo/sample_set.py, FACES) are this many times the longest side of
# the face's box, centred on it.
HEAD_PER_FACE = 1.7


def photo(name: str) -> np.ndarray:
    """An RGB uint8 photo from scikit-image, with even sides (video encoders need them)."""
    image = getattr(skimage.data, name)()
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    image = image[..., :3]
    return np.ascontiguousarray(image[: image.shape[0] // 2 * 2, : image.shape[1] // 2 * 2])


def panned_frames(image: np.ndarray, count: int, shift: int = 4) -> list[np.ndarray]:
    """`count` frames of `image` moving right by `shift` pixels a frame (edge pixels repeated)."""
    frames = []
    for i in range(count):
        dx = i * shift
        frames.append(np.concatenate([np.repeat(image[:, :1], dx, axis=1), image[:, : image.shape[1] - dx]], axis=1))
    return frames


def write_clip(
    path: Path, frames: list[np.ndarray], fps=25, *, pts=None, time_base=None, codec: str = "libx264",
    pix_fmt: str = "yuv420p", clockwise: int = 0, options=None,
) -> Path:
    """Encode RGB frames; with `pts` (and fps=None) each frame gets that timestamp in `time_base`.

    `clockwise` stores display-rotation metadata, as phones do for portrait video.
    """
    with av.open(str(path), "w", options=options or {}) as container:
        stream = container.add_stream(codec, rate=Fraction(fps) if fps is not None else None)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = pix_fmt
        if time_base is not None:
            stream.codec_context.time_base = time_base
        if clockwise:
            stream.set_display_rotation(-clockwise)  # PyAV takes the angle counter-clockwise
        for i, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            if pts is not None:
                frame.pts, frame.time_base = pts[i], time_base
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def write_tone(path: Path) -> Path:
    """A one-second audio-only file (a 440 Hz sine): a clip with no video stream."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=16000)
        tone = (np.sin(2 * np.pi * 440 * np.arange(16000) / 16000) * 10000).astype(np.int16)
        frame = av.AudioFrame.from_ndarray(tone[None], format="s16", layout="mono")
        frame.sample_rate = 16000
        container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def read_clip(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


def moving_face(scene: str, frames: int = 50, step: int = 4) -> list[np.ndarray]:
    """The astronaut's head moving right across a real scene, `step` px a frame."""
    background, head = photo(scene), photo("astronaut")[HEAD]
    out = []
    for i in range(frames):
        frame = background.copy()
        frame[100:300, 40 + step * i : 240 + step * i] = head
        out.append(frame)
    return out


@lru_cache(maxsize=None)
def head(face: str, side: int) -> np.ndarray:
    """The head square of one of the demo's real face photos (a key of demo.sample_set.FACES), side x side RGB."""
    left, top, square = FACES[face].head
    image = FACES[face].photo.load().crop((left, top, left + square, top + square))
    return np.asarray(image.resize((side, side), Image.BILINEAR))


def face_box(left: int, top: int, side: int) -> np.ndarray:
    """Where the face of a head square pasted at (left, top) lies: a square HEAD_PER_FACE times smaller."""
    centre, half = np.array([left + side / 2, top + side / 2]), side / HEAD_PER_FACE / 2
    return np.concatenate([centre - half, centre + half]).astype(np.float32)


def heads_on_scene(scene: str, size: tuple[int, int], heads) -> np.ndarray:
    """A scene photo scaled to `size` (height, width) with head squares (face, left, top, side) pasted on it."""
    height, width = size
    frame = np.array(Image.fromarray(photo(scene)).resize((width, height), Image.BILINEAR))
    for face, left, top, side in heads:
        assert 0 <= left and 0 <= top and left + side <= width and top + side <= height, (face, left, top, side)
        frame[top : top + side, left : left + side] = head(face, side)
    return frame


# Audio codecs the audio tests encode with: PyAV's encoder, its sample format, and a container for it.
AUDIO_CODECS = {"aac": ("aac", "fltp", ".mp4"), "mp3": ("libmp3lame", "fltp", ".mp4"), "opus": ("libopus", "flt", ".mkv"),
                "flac": ("flac", "s16", ".mkv"), "ac3": ("ac3", "fltp", ".mkv")}


def tone(frequency: float, seconds: float, rate: int, amplitude: float = 0.3) -> np.ndarray:
    """A sine of `frequency` Hz, `seconds` long, at `rate` samples a second."""
    return amplitude * np.sin(2 * np.pi * frequency * np.arange(round(seconds * rate)) / rate)


def write_av_clip(path: Path, frames: list[np.ndarray], audio: np.ndarray | None, rate: int = 44100,
                  codec: str = "aac", layout: str = "stereo", fps: int = 25, audio_start: float = 0.0) -> Path:
    """A clip of `frames` (H.264 at `fps`) and an audio track of `audio` (channels, samples) in [-1, 1] at `rate`,
    encoded with `codec` (a key of AUDIO_CODECS) and starting `audio_start` seconds after the first frame."""
    encoder, sample_format, _ = AUDIO_CODECS[codec]
    with av.open(str(path), "w") as container:
        video = container.add_stream("libx264", rate=fps)
        video.height, video.width = frames[0].shape[:2]
        video.pix_fmt = "yuv420p"
        sound = container.add_stream(encoder, rate=rate, layout=layout) if audio is not None else None
        for i, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = i
            container.mux(video.encode(frame))
        if sound is not None:
            samples = audio.astype(np.float32) if sample_format.startswith("flt") else (audio * 32767).astype(np.int16)
            packed = not sample_format.endswith("p")
            step = sound.codec_context.frame_size or 1024
            first = round(audio_start * rate)
            for at in range(0, samples.shape[1], step):
                chunk = samples[:, at:at + step]
                array = np.ascontiguousarray(chunk.T.reshape(1, -1) if packed else chunk)
                frame = av.AudioFrame.from_ndarray(array, format=sample_format, layout=layout)
                frame.sample_rate, frame.pts = rate, first + at
                container.mux(sound.encode(frame))
            container.mux(sound.encode())
        container.mux(video.encode())
    return path


def burst_track(seconds: float, rate: int, burst: tuple[float, float], start: float = 0.0, channels: int = 2,
                frequency: float = 1000) -> np.ndarray:
    """(channels, samples) in [-1, 1]: a quiet 300 Hz hum with a loud burst of `frequency` Hz during `burst` (seconds
    of the video), for a track that starts `start` seconds into a video `seconds` long and lasts to its end."""
    hum = tone(300, seconds - start, rate, amplitude=0.03)
    first = round((burst[0] - start) * rate)
    loud = tone(frequency, burst[1] - burst[0], rate)
    hum[first:first + len(loud)] += loud[:max(0, len(hum) - first)]
    return np.stack([hum] * channels)


def burst_frames(stamps: np.ndarray, window: float, burst: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Of the sampled frames at `stamps`, each hearing `window` seconds around it: those whose windows lie inside
    `burst`, and those whose windows lie an analysis frame (25 ms) or more away from it."""
    inside = (stamps - window / 2 >= burst[0] - 1e-6) & (stamps + window / 2 <= burst[1] + 1e-6)
    away = (stamps + window / 2 < burst[0] - 0.025) | (stamps - window / 2 > burst[1] + 0.025)
    return inside, away


def brightness(pixels: np.ndarray) -> np.ndarray:
    """The mean luma (ITU-R 601) of RGB `pixels` (..., N, 3): one number per row of N pixels."""
    return (pixels[..., :3].astype(float) @ [0.299, 0.587, 0.114]).mean(axis=-1)
