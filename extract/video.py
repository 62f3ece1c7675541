"""Stage 1's decoder: a clip's frames sampled at a fixed rate by presentation time, upright, in RGB.

Decoding streams through the file (one frame in memory at a time), with FFmpeg's threads, and
converts to RGB only the frames it keeps. Every problem a user's clip can have (missing, empty,
not a video, no video stream, damaged or truncated data) is a `VideoError` naming the file.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from extract.settings import DEFAULT_FPS

# Half a millisecond: containers with a 1/1000 time base round each frame time to the nearest
# millisecond, so a frame meant for a grid time can be stored up to 0.5 ms before it.
_TOLERANCE = 0.0005


class VideoError(Exception):
    """A clip that cannot be decoded; the message is one line naming the file."""


@dataclass(frozen=True)
class VideoInfo:
    path: Path
    width: int  # after rotation, as sample_frames yields them
    height: int
    rotation: int  # clockwise turn, in degrees, that makes the decoded pictures upright
    fps: float  # the stream's average frame rate as stored; 0.0 if unknown
    duration: float  # seconds: the stream's, else the container's, else 0.0
    codec: str
    origin: float  # the first frame's time on the container's clock, from which frame times count


@dataclass
class SampledFrame:
    image: np.ndarray  # (H, W, 3) uint8 RGB, upright
    timestamp: float  # seconds from the stream's first frame
    index: int  # position among the kept frames


def probe(path) -> VideoInfo:
    """The clip's size, rotation, rate, duration and codec, from its headers and first frame."""
    path = Path(path)
    with _open_video(path) as (container, stream):
        # PyAV exposes the display matrix only on decoded frames, so one frame is decoded.
        first = next(_decoded_frames(path, container, stream), None)
        if first is None:
            raise VideoError(f"{path}: no decodable video frames")
        rotation = _clockwise_turn(first)
        width, height = (first.height, first.width) if rotation in (90, 270) else (first.width, first.height)
        clock = _PresentationClock(stream)
        clock.seconds(first)
        return VideoInfo(
            path=path,
            width=width,
            height=height,
            rotation=rotation,
            fps=float(stream.average_rate or 0),
            duration=_duration(container, stream),
            codec=stream.codec_context.name,
            origin=clock.origin_seconds(),
        )


def header_duration(path) -> float:
    """The clip's duration in seconds as its headers state it (0.0 if unstated); decodes nothing."""
    path = Path(path)
    with _open_video(path) as (container, stream):
        return _duration(container, stream)


def read_audio(path, audio) -> None:
    """Hand every packet of the clip's audio track to `audio` (an `extract.audio.TrackReader`), decoding no video:
    for a set whose frames were sampled before. VideoError when the file cannot be opened as a video; a file
    damaged part-way stops the audio there, as `audio.stop` records."""
    path = Path(path)
    with _open_video(path) as (container, _):
        audio_stream = audio.open(container)
        if audio_stream is None:
            return
        try:
            for packet in container.demux(audio_stream):
                audio.feed(packet)
        except av.FFmpegError as exc:
            audio.stop(f"the file is damaged past its readable audio ({exc.strerror})")


def sample_frames(path, fps: float = DEFAULT_FPS, threads: int = 0, audio=None) -> Iterator[SampledFrame]:
    """Yield the clip's frames sampled at `fps`, upright RGB, with their presentation times.

    With `audio` (an `extract.audio.TrackReader`), the clip's audio track is demuxed in the same
    pass and each of its packets handed to `audio.feed`; `audio.set_video_origin` learns the
    first video frame's time on the container's clock. Nothing the audio does stops the video.

    The sampling rule (part of the feature format): times are in seconds from the first decoded
    frame's presentation time, and the grid is t_k = k / fps for k = 0, 1, 2... For each grid
    time the first frame whose time is >= t_k - 0.5 ms is kept. A frame is kept at most once:
    once kept, every grid time it covers is done and the grid moves on to the first t_k after
    it. So a source slower than `fps` gives each of its frames once, and a gap in a
    variable-frame-rate stream skips the grid times inside it instead of repeating a frame.

    `threads=0` lets FFmpeg choose the number of decoding threads. This is a generator: nothing
    is opened before the first frame is asked for, and the file is closed when it is exhausted,
    closed or garbage-collected. A clip that fails part-way raises `VideoError` after the frames
    already yielded; it never ends early in silence where FFmpeg reports damage.
    """
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    path = Path(path)
    with _open_video(path) as (container, stream):
        # FFmpeg's default slice threading: frame threading measured slower here for both
        # 640x360 and 1280x720 H.264 (benchmarks/README.md), and it hides decoding errors.
        stream.codec_context.thread_count = threads
        clock = _PresentationClock(stream)
        pending = 0  # the grid index k still waiting for a frame
        kept = 0
        for frame in _decoded_frames(path, container, stream, audio):
            seconds = clock.seconds(frame)
            if audio is not None and clock.frames == 1:
                audio.set_video_origin(clock.origin_seconds())
            if seconds < pending / fps - _TOLERANCE:
                continue
            image = _upright(frame.to_ndarray(format="rgb24"), _clockwise_turn(frame))
            yield SampledFrame(image=image, timestamp=seconds, index=kept)
            kept += 1
            while pending / fps - _TOLERANCE <= seconds:
                pending += 1
        if clock.frames == 0:
            raise VideoError(f"{path}: no decodable video frames")


@contextmanager
def _open_video(path: Path):
    """The open container and its first video stream, closed on leaving."""
    if not path.exists():
        raise VideoError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise VideoError(f"{path}: empty file (0 bytes)")
    try:
        # Titles in clips from Chinese TV are often GBK, not UTF-8; strict decoding of that
        # metadata (which is never used) would refuse a playable video.
        container = av.open(str(path), metadata_errors="replace")
    except av.FFmpegError as exc:
        raise VideoError(f"{path}: not a readable video file ({exc.strerror})") from exc
    with container:
        if not container.streams.video:
            kinds = ", ".join(sorted({s.type for s in container.streams})) or "none"
            raise VideoError(f"{path}: no video stream (streams: {kinds})")
        yield container, container.streams.video[0]


def _decoded_frames(path: Path, container, stream, audio=None) -> Iterator[av.VideoFrame]:
    """The stream's frames in presentation order; damage FFmpeg detects is a VideoError. With `audio`, the audio
    track's packets go to it on the way."""
    decoded = 0
    audio_stream = audio.open(container) if audio is not None else None
    streams = (stream, audio_stream) if audio_stream is not None else (stream,)
    try:
        for packet in container.demux(*streams):
            if packet.stream is audio_stream:
                audio.feed(packet)
                continue
            # A packet cut short can decode without an error (and does, with frame threading,
            # when other frames come out in the same call), so a truncated file would end
            # silently. The demuxer flags such a packet (a short read, a broken transport
            # packet) itself.
            if packet.is_corrupt:
                raise VideoError(f"{path}: damaged or truncated video data after {decoded} frames")
            for frame in packet.decode():
                decoded += 1
                yield frame
    except av.FFmpegError as exc:
        raise VideoError(f"{path}: decoding failed after {decoded} frames ({exc.strerror})") from exc


class _PresentationClock:
    """Each frame's presentation time in seconds from the first frame.

    The decoder hands frames over in presentation order. Their pts is normally right, but an
    AVI (which stores no pts) with B-frames gives each frame its packet's decode-order time, so
    pts goes backwards; like FFmpeg's best-effort timestamp (which PyAV does not expose), the
    packet dts is used instead once pts has gone backwards more often than dts. Raw streams
    (e.g. a bare .h264 file) carry neither, and frames are counted at the stream's rate. Each
    source is measured from its own value at the first frame, so the constant delay between a
    frame's pts and the dts of the packet that released it cancels out.
    """

    def __init__(self, stream):
        self.stream = stream
        self.frames = 0
        self.origin: dict[str, int] = {}
        self.last: dict[str, int] = {}
        self.backwards = {"pts": 0, "dts": 0}

    def seconds(self, frame) -> float:
        stamps = {"pts": frame.pts, "dts": frame.dts, "count": self.frames}
        self.frames += 1
        for source in ("pts", "dts", "count"):
            self._note(source, stamps[source])
        source = self._trusted(stamps)
        return float((stamps[source] - self.origin[source]) * self._unit(source))

    def _note(self, source: str, stamp: int | None) -> None:
        if stamp is None:
            return
        self.origin.setdefault(source, stamp)
        if source in self.backwards and source in self.last:
            self.backwards[source] += stamp <= self.last[source]
        self.last[source] = stamp

    def origin_seconds(self) -> float:
        """The first frame's time on the container's clock (the stream's start when its frames carry no times)."""
        for source in ("pts", "dts"):
            if source in self.origin:
                return float(self.origin[source] * self.stream.time_base)
        start = self.stream.start_time
        return float(start * self.stream.time_base) if start is not None else 0.0

    def _trusted(self, stamps: dict) -> str:
        if stamps["pts"] is not None and (stamps["dts"] is None or self.backwards["pts"] <= self.backwards["dts"]):
            return "pts"
        return "dts" if stamps["dts"] is not None else "count"

    def _unit(self, source: str) -> Fraction:
        if source == "count":
            return 1 / Fraction(self.stream.guessed_rate or self.stream.average_rate)
        return self.stream.time_base


def _clockwise_turn(frame) -> int:
    """The clockwise turn (0, 90, 180 or 270) that makes this frame upright.

    PyAV 18 reads the display matrix side data into `frame.rotation`, the angle the matrix turns
    the picture counter-clockwise; FFmpeg no longer exposes the old `rotate` stream tag.
    """
    return round(-frame.rotation / 90) % 4 * 90


def _upright(image: np.ndarray, clockwise: int) -> np.ndarray:
    # np.rot90 turns counter-clockwise for positive k; the copy keeps strides positive, as
    # torch.as_tensor needs.
    return np.ascontiguousarray(np.rot90(image, k=-(clockwise // 90)))


def _duration(container, stream) -> float:
    if stream.duration is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / av.time_base
    return 0.0
