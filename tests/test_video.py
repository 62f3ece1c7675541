"""The stage-1 decoder on real clips encoded here with PyAV from scikit-image photos."""

from __future__ import annotations

import inspect
from fractions import Fraction

import av
import numpy as np
import pytest

from extract.settings import DEFAULT_FPS
from extract.video import VideoError, probe, sample_frames
from tests.media import panned_frames, photo, read_clip, write_clip, write_tone

# The astronaut's face and shoulders: textured enough that frames 2 px apart are told apart
# through H.264's losses.
SCENE = photo("astronaut")[96:288, 128:384]


def source_index(image, sources) -> int:
    """Which source frame a decoded picture is: the nearest by mean absolute difference."""
    errors = [np.abs(image.astype(np.int16) - source).mean() for source in sources]
    best = int(np.argmin(errors))
    assert errors[best] < 4 and sorted(errors)[1] > 2 * errors[best], errors  # a clear winner
    return best


def kept(path, sources, **kwargs):
    """(source index, timestamp, index) of every frame sample_frames keeps."""
    return [(source_index(f.image, sources), f.timestamp, f.index) for f in sample_frames(path, **kwargs)]


@pytest.fixture(scope="module")
def panned():
    return panned_frames(SCENE, 100, shift=2)


@pytest.fixture(scope="module")
def clip_25fps(tmp_path_factory, panned):
    """Four seconds at 25 fps, the scene moving 2 px right a frame."""
    return write_clip(tmp_path_factory.mktemp("clips") / "pan25.mp4", panned, fps=25)


def test_a_25fps_clip_gives_every_fifth_frame_on_the_5fps_grid(clip_25fps, panned):
    frames = list(sample_frames(clip_25fps))
    assert DEFAULT_FPS == 5.0
    assert [f.index for f in frames] == list(range(20))
    assert np.allclose([f.timestamp for f in frames], np.arange(20) * 0.2, atol=1e-3)
    assert [source_index(f.image, panned) for f in frames] == list(range(0, 100, 5))
    # Bit for bit the frames a plain decode of the whole clip gives.
    decoded = read_clip(clip_25fps)
    for frame in frames:
        assert frame.image.dtype == np.uint8 and frame.image.shape == SCENE.shape
        assert np.array_equal(frame.image, decoded[frame.index * 5])


def test_probe_reads_the_clip_without_decoding_it_all(clip_25fps):
    info = probe(clip_25fps)
    assert (info.width, info.height, info.rotation) == (SCENE.shape[1], SCENE.shape[0], 0)
    assert info.fps == 25.0 and info.duration == pytest.approx(4.0, abs=0.05)
    assert info.codec == "h264" and info.path == clip_25fps


@pytest.mark.parametrize("threads", [1, 2])
def test_the_thread_count_does_not_change_the_frames(clip_25fps, threads):
    default, chosen = list(sample_frames(clip_25fps)), list(sample_frames(clip_25fps, threads=threads))
    assert [f.timestamp for f in chosen] == [f.timestamp for f in default]
    assert all(np.array_equal(a.image, b.image) for a, b in zip(chosen, default))


def test_sampling_is_lazy_and_opens_nothing_until_asked(tmp_path):
    # Streaming is by construction: a generator holding one decoded frame at a time, so
    # memory does not grow with the clip's length.
    frames = sample_frames(tmp_path / "not-there.mp4")
    assert inspect.isgenerator(frames)
    with pytest.raises(VideoError):
        next(frames)


def test_closing_the_generator_part_way_is_clean(clip_25fps):
    frames = sample_frames(clip_25fps)
    assert next(frames).index == 0
    frames.close()
    assert list(frames) == []


# Irregular gaps, in milliseconds: the 340 -> 900 gap holds the grid times 0.4, 0.6 and 0.8,
# which frame 900 covers together, once.
VFR_PTS = [0, 40, 80, 200, 240, 300, 340, 900, 940, 1000, 1040, 1500]


@pytest.mark.parametrize("suffix", ["mkv", "mp4"])
def test_variable_frame_rate_keeps_the_first_frame_at_or_after_each_grid_time(tmp_path, panned, suffix):
    sources = panned[: len(VFR_PTS)]
    path = write_clip(tmp_path / f"vfr.{suffix}", sources, None, pts=VFR_PTS, time_base=Fraction(1, 1000))
    result = kept(path, sources)
    assert [s for s, _, _ in result] == [0, 3, 7, 9, 11]
    assert [t for _, t, _ in result] == pytest.approx([0.0, 0.2, 0.9, 1.0, 1.5], abs=1e-6)
    assert [i for _, _, i in result] == list(range(5))


def test_a_frame_half_a_millisecond_early_still_counts(tmp_path, panned):
    # In tenths of a millisecond: 0.1996 s is within the tolerance of 0.2 s, 0.3994 s is not of 0.4 s.
    sources = panned[:4]
    time_base = Fraction(1, 10000)
    path = write_clip(tmp_path / "early.mp4", sources, None, pts=[0, 1996, 3994, 4000], time_base=time_base)
    with av.open(str(path)) as container:
        assert container.streams.video[0].time_base == time_base
    result = kept(path, sources)
    assert [s for s, _, _ in result] == [0, 1, 3]
    assert [t for _, t, _ in result] == pytest.approx([0.0, 0.1996, 0.4], abs=1e-9)


@pytest.mark.parametrize(
    "suffix, time_base",
    [("ts", Fraction(1, 90000)), ("avi", Fraction(1001, 30000))],
    ids=["mpegts-1/90000", "avi-1001/30000"],
)
def test_odd_time_bases_give_exact_times_from_the_first_frame(tmp_path, panned, suffix, time_base):
    """29.97 fps: the grid time 0.2 s falls on frame 6 (0.2002 s), 0.4 s on frame 12, ...

    The transport stream starts at a nonzero pts. The AVI stores no pts at all, and its H.264
    B-frames make the pts FFmpeg reconstructs go backwards, so the clock falls back on dts.
    """
    sources = panned[:30]
    path = write_clip(tmp_path / f"ntsc.{suffix}", sources, Fraction(30000, 1001))
    with av.open(str(path)) as container:
        assert container.streams.video[0].time_base == time_base
    result = kept(path, sources)
    assert [s for s, _, _ in result] == [0, 6, 12, 18, 24]
    assert [t for _, t, _ in result] == pytest.approx([k * 6 * 1001 / 30000 for k in range(5)], abs=1e-6)


def test_sampling_faster_than_the_source_gives_each_frame_once(tmp_path, panned):
    sources = panned[:8]
    path = write_clip(tmp_path / "slow.mp4", sources, fps=10)
    result = kept(path, sources, fps=30)
    assert [s for s, _, _ in result] == list(range(8))
    assert [t for _, t, _ in result] == pytest.approx([i / 10 for i in range(8)], abs=1e-3)


def test_a_raw_stream_without_timestamps_is_timed_by_counting_frames(tmp_path, panned):
    sources = panned[:20]
    path = write_clip(tmp_path / "bare.h264", sources, fps=10)
    with av.open(str(path)) as container:
        assert all(f.pts is None and f.dts is None for f in container.decode(video=0))
    result = kept(path, sources)
    assert [s for s, _, _ in result] == list(range(0, 20, 2))
    assert [t for _, t, _ in result] == pytest.approx([k * 0.2 for k in range(10)], abs=1e-6)


def tkhd_matrix(path):
    """The (a, b, c, d) of the mp4 track header's display matrix, in 16.16 fixed point."""
    data = path.read_bytes()
    at = data.index(b"tkhd") + 4
    assert data[at] == 0  # version 0: 32-bit times, so the matrix starts 40 bytes in
    matrix = np.frombuffer(data[at + 40 : at + 76], dtype=">i4")
    return tuple(int(v) // 65536 for v in matrix[[0, 1, 3, 4]])


def test_rotation_is_written_the_way_phones_write_portrait_video(tmp_path):
    # ISO/QuickTime (a, b, c, d) = (0, 1, -1, 0) maps the top-left corner to the top-right:
    # a quarter turn clockwise, the matrix a phone held upright records.
    path = write_clip(tmp_path / "portrait.mp4", [SCENE] * 3, 10, clockwise=90)
    assert tkhd_matrix(path) == (0, 1, -1, 0)


@pytest.mark.parametrize("clockwise", [90, 180, 270])
def test_rotated_clips_come_out_upright(tmp_path, clockwise):
    path = write_clip(tmp_path / f"turn{clockwise}.mp4", [SCENE] * 3, 10, clockwise=clockwise)
    upright = np.rot90(SCENE, k=-clockwise // 90)  # negative k: clockwise
    info = probe(path)
    assert info.rotation == clockwise
    assert (info.height, info.width) == upright.shape[:2]
    frames = list(sample_frames(path))
    assert len(frames) == 2
    for frame in frames:
        assert frame.image.shape == upright.shape and frame.image.flags.c_contiguous
        assert np.abs(frame.image.astype(np.int16) - upright).mean() < 4
        assert np.abs(frame.image.astype(np.int16) - np.rot90(upright, 2)).mean() > 20


@pytest.mark.parametrize(
    "suffix, codec, pix_fmt, decoder",
    [("mp4", "mpeg4", "yuv420p", "mpeg4"), ("mp4", "libx264", "yuv444p", "h264"), ("mkv", "ffv1", "yuv444p", "ffv1")],
)
def test_odd_frame_sizes_keep_their_size(tmp_path, suffix, codec, pix_fmt, decoder):
    image = np.ascontiguousarray(SCENE[:97, :161])
    path = write_clip(tmp_path / f"odd.{suffix}", [image] * 3, 10, codec=codec, pix_fmt=pix_fmt)
    info = probe(path)
    assert (info.width, info.height, info.codec) == (161, 97, decoder)
    frames = list(sample_frames(path))
    assert len(frames) == 2
    assert all(f.image.shape == (97, 161, 3) for f in frames)
    assert np.abs(frames[0].image.astype(np.int16) - image).mean() < 4


def test_non_utf8_metadata_does_not_stop_a_clip(tmp_path):
    path = tmp_path / "gbk-title.mp4"
    with av.open(str(path), "w", metadata_encoding="gbk") as container:
        container.metadata["title"] = "中文标题"
        stream = container.add_stream("libx264", 10)
        stream.height, stream.width = SCENE.shape[:2]
        container.mux(stream.encode(av.VideoFrame.from_ndarray(SCENE, format="rgb24")))
        container.mux(stream.encode())
    with pytest.raises(UnicodeDecodeError):
        av.open(str(path)).close()  # PyAV's default is strict decoding
    assert len(list(sample_frames(path))) == 1


def bad_input(tmp_path, kind, clip):
    if kind == "missing":
        return tmp_path / "missing.mp4"
    if kind == "empty":
        (tmp_path / "empty.mp4").touch()
        return tmp_path / "empty.mp4"
    if kind == "text":
        (tmp_path / "notes.mp4").write_text("not a video\n" * 20)
        return tmp_path / "notes.mp4"
    if kind == "audio only":
        return write_tone(tmp_path / "tone.wav")
    # The mp4 muxer writes the index (moov) last, so the first half has frames but no index.
    data = clip.read_bytes()
    (tmp_path / "half.mp4").write_bytes(data[: len(data) // 2])
    return tmp_path / "half.mp4"


@pytest.mark.parametrize(
    "kind, says",
    [
        ("missing", "file not found"),
        ("empty", "empty file"),
        ("text", "not a readable video file (Invalid data"),
        ("audio only", "no video stream (streams: audio)"),
        ("half mp4", "not a readable video file"),
    ],
)
def test_bad_inputs_are_one_line_errors_naming_the_file(tmp_path, clip_25fps, kind, says):
    path = bad_input(tmp_path, kind, clip_25fps)
    for attempt in (lambda: probe(path), lambda: list(sample_frames(path))):
        with pytest.raises(VideoError) as caught:
            attempt()
        message = str(caught.value)
        assert message.startswith(f"{path}: ") and says in message and "\n" not in message


def test_an_mp4_cut_short_fails_after_the_frames_before_the_cut(tmp_path, panned):
    # With the index first (faststart) the frames before the cut decode; the packet the cut
    # goes through is short, which the demuxer flags, and the clip fails instead of ending early.
    whole = write_clip(tmp_path / "whole.mp4", panned, 25, options={"movflags": "faststart"})
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(whole.read_bytes()[: int(whole.stat().st_size * 0.8)])
    frames = sample_frames(cut)
    before = []
    with pytest.raises(VideoError, match=r"damaged or truncated video data after \d+ frames") as caught:
        for frame in frames:
            before.append(source_index(frame.image, panned))
    assert str(caught.value).startswith(f"{cut}: ")
    assert before and before == list(range(0, 5 * len(before), 5))


def test_a_matroska_file_cut_short_ends_early_without_an_error(tmp_path, panned):
    """A known limit: Matroska (and MPEG-TS) drop the block the cut goes through without a
    flag or an error, so the clip reads as a shorter one: correct frames, none after the cut."""
    whole = write_clip(tmp_path / "whole.mkv", panned, fps=25)
    cut = tmp_path / "cut.mkv"
    cut.write_bytes(whole.read_bytes()[: int(whole.stat().st_size * 0.8)])
    result = kept(cut, panned)
    assert 0 < len(result) < 20
    assert [s for s, _, _ in result] == list(range(0, 5 * len(result), 5))


def test_a_non_positive_rate_is_a_programming_error(clip_25fps):
    with pytest.raises(ValueError, match="fps must be positive"):
        next(sample_frames(clip_25fps, fps=0))
