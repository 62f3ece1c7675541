"""The ear of stage 1 (extract/audio.py) on real encodings made here with PyAV: AAC at 44.1 and 48 kHz stereo, MP3,
Opus, 8 kHz mono, 5.1; a track starting 0.5 s after the video, one ending before it, none, a damaged one.

Every clip is real H.264 video with a real audio track. The features are checked against a reference computed
independently from the same decoded samples: librosa's own mel spectrogram of the whole track, decoded and
resampled here, and the window statistics in numpy. A tone burst at a known time must land in the steps whose
windows hold it, and nowhere else.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import av
import librosa
import numpy as np
import pytest

from extract.audio import EDGE, Egemaps, TrackReader
from extract.clips import embed_clips, recipe_of
from extract.settings import AUDIO_FEATURES, ExtractSettings, NetworkChoice
from extract.video import sample_frames
from features.reader import open_features
from features.schema import comparable
from features.recipe import FeatureRecipe
from features.schema import AudioTrack
from features.tools import validate
from manifests.manifest import ClipEntry, read_manifest, write_manifest
from tests.cli_runs import one_line_error, run_cli
from tests.feature_files import assert_same_clips, read_all
from tests.media import AUDIO_CODECS, burst_track, moving_face, tone, write_av_clip

FPS = 5.0
SECONDS = 3.0
BURST = (1.0, 1.4)  # seconds of the video during which a 1 kHz burst sounds over a quiet 300 Hz hum
SETTINGS = ExtractSettings("train", context_backbone="mobilenet_v2", device="cpu")
# codec, rate, layout: the encodings of the issue
ENCODINGS = {
    "aac 44.1 kHz stereo": ("aac", 44100, "stereo"),
    "aac 48 kHz stereo": ("aac", 48000, "stereo"),
    "mp3": ("mp3", 44100, "stereo"),
    "opus": ("opus", 48000, "stereo"),
    "aac 8 kHz mono": ("aac", 8000, "mono"),
    "ac3 5.1": ("ac3", 48000, "5.1"),
}


@pytest.fixture(scope="module")
def recipe(extraction_weights) -> FeatureRecipe:
    return recipe_of(SETTINGS)


@pytest.fixture(scope="module")
def frames() -> list[np.ndarray]:
    return moving_face("coffee", frames=round(SECONDS * 25))


def burst_frequency(rate: int) -> float:
    return 1000 if rate > 8000 else 700


def burst_signal(rate: int, channels: int, seconds: float = SECONDS, start: float = 0.0) -> np.ndarray:
    """A hum with a burst at BURST (video time, for a track starting at `start` and ending at `seconds`)."""
    return burst_track(seconds, rate, BURST, start, channels, burst_frequency(rate))


def heard(path: Path, recipe: FeatureRecipe):
    reader = TrackReader(recipe)
    stamps = [frame.timestamp for frame in sample_frames(path, FPS, audio=reader)]
    return np.array(stamps), reader.heard(stamps)


def decoded_track(path: Path, rate: int) -> tuple[float, np.ndarray, float]:
    """Independently of extract/audio.py: (the first audio sample's time, the track as mono float64 at `rate`, the
    first video frame's time), all on the container's clock."""
    with av.open(str(path)) as container:
        video_start = next(frame.time for frame in container.decode(video=0))
    with av.open(str(path)) as container:
        resampler = av.AudioResampler(format="dbl", layout="mono", rate=rate)
        start, pieces = None, []
        for frame in container.decode(audio=0):
            start = frame.time if start is None else start
            pieces += [piece.to_ndarray()[0] for piece in resampler.resample(frame)]
        pieces += [piece.to_ndarray()[0] for piece in resampler.resample(None)]
    return start, np.concatenate(pieces), video_start


def reference_steps(path: Path, recipe: FeatureRecipe, stamps: np.ndarray) -> np.ndarray:
    """librosa's log-mel spectrogram of the whole decoded track, averaged over each step's window in numpy."""
    start, signal, video_start = decoded_track(path, recipe.audio_rate)
    hop, length = round(recipe.audio_hop * recipe.audio_rate), round(recipe.audio_frame * recipe.audio_rate)
    mel = librosa.feature.melspectrogram(y=signal, sr=recipe.audio_rate, n_fft=512, hop_length=hop, win_length=length,
                                         window="hann", center=True, pad_mode="constant", power=2.0,
                                         n_mels=recipe.audio_bands)
    frames = np.log(np.maximum(mel, 1e-10)).T
    centres = start - video_start + np.arange(len(frames)) * recipe.audio_hop
    steps = np.zeros((len(stamps), 2 * recipe.audio_bands))
    for step, t in enumerate(stamps):
        inside = frames[(centres >= t - recipe.audio_window / 2 - EDGE) & (centres < t + recipe.audio_window / 2 - EDGE)]
        if np.abs(centres - t).min() <= recipe.audio_hop + EDGE:  # audio within a hop: heard
            steps[step] = np.concatenate([inside.mean(axis=0), inside.std(axis=0)])
    return steps


def loud_steps(audio: np.ndarray, has_audio: np.ndarray, recipe: FeatureRecipe, frequency: float) -> set[int]:
    """The steps whose mean log-mel energy in the band of `frequency` stands well above the other steps' (26 dB:
    the hum's onset splatters a little into every band)."""
    centres = librosa.mel_frequencies(n_mels=recipe.audio_bands + 2, fmax=recipe.audio_rate / 2)[1:-1]
    energy = audio[:, int(np.argmin(np.abs(centres - frequency)))]
    quiet = np.median(energy[has_audio])
    return set(np.flatnonzero(has_audio & (energy > quiet + 6.0)).tolist())


def burst_steps(stamps: np.ndarray, window: float) -> set[int]:
    """Steps whose window holds at least a third of a window of the burst."""
    overlap = np.minimum(stamps + window / 2, BURST[1]) - np.maximum(stamps - window / 2, BURST[0])
    return set(np.flatnonzero(overlap > window / 3).tolist())


def may_hear_burst(stamps: np.ndarray, window: float) -> set[int]:
    overlap = np.minimum(stamps + window / 2, BURST[1]) - np.maximum(stamps - window / 2, BURST[0])
    return set(np.flatnonzero(overlap > 0).tolist())


@pytest.mark.parametrize("encoding", sorted(ENCODINGS))
def test_each_encoding_gives_the_reference_features_and_the_burst_in_its_steps(encoding, recipe, frames, tmp_path):
    codec, rate, layout = ENCODINGS[encoding]
    channels = av.AudioLayout(layout).nb_channels
    path = write_av_clip(tmp_path / f"clip{AUDIO_CODECS[codec][2]}", frames, burst_signal(rate, channels), rate,
                         codec, layout=layout)
    stamps, got = heard(path, recipe)
    assert got.track == AudioTrack(codec, rate, channels, "")
    assert got.has_audio.all() and got.audio.shape == (len(stamps), recipe.audio_dim)
    np.testing.assert_allclose(got.audio, reference_steps(path, recipe, stamps), rtol=1e-4, atol=1e-3)
    loud = loud_steps(got.audio, got.has_audio, recipe, burst_frequency(rate))
    assert burst_steps(stamps, recipe.audio_window) <= loud <= may_hear_burst(stamps, recipe.audio_window), loud


def test_a_track_starting_late_is_heard_where_it_plays(recipe, frames, tmp_path):
    start = 0.5
    path = write_av_clip(tmp_path / "late.mp4", frames, burst_signal(44100, 2, SECONDS, start), 44100,
                         audio_start=start)
    stamps, got = heard(path, recipe)
    # AAC's encoder primes 1024 samples (23 ms) before the first: the track plays from 0.477 s.
    assert not got.has_audio[stamps < 0.45].any() and got.has_audio[stamps > 0.55].all()
    np.testing.assert_allclose(got.audio, reference_steps(path, recipe, stamps), rtol=1e-4, atol=1e-3)
    assert not got.audio[~got.has_audio].any()
    loud = loud_steps(got.audio, got.has_audio, recipe, burst_frequency(44100))
    assert burst_steps(stamps, recipe.audio_window) <= loud <= may_hear_burst(stamps, recipe.audio_window), loud


def test_a_track_ending_before_the_video_stops_being_heard_there(recipe, frames, tmp_path):
    path = write_av_clip(tmp_path / "short.mp4", frames, burst_signal(44100, 2, seconds=1.5), 44100)
    stamps, got = heard(path, recipe)
    assert got.has_audio[stamps < 1.45].all() and not got.has_audio[stamps > 1.6].any()
    assert not got.audio[~got.has_audio].any()


def test_a_clip_without_a_track_is_silent_and_says_so(recipe, frames, tmp_path):
    path = write_av_clip(tmp_path / "mute.mp4", frames, None)
    stamps, got = heard(path, recipe)
    assert got.track == AudioTrack(note="no audio track")
    assert not got.has_audio.any() and not got.audio.any() and len(stamps) == SECONDS * FPS


def damaged(path: Path, seconds: tuple[float, float]) -> Path:
    """`path` with the audio packets of `seconds` overwritten with random bytes, the video's left whole."""
    with av.open(str(path)) as container:
        packets = [(packet.pos, packet.size) for packet in container.demux(container.streams.audio[0])
                   if packet.size and seconds[0] <= packet.pts * packet.time_base < seconds[1]]
    data, rng = bytearray(path.read_bytes()), np.random.default_rng(0)
    for position, size in packets:
        data[position:position + size] = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
    out = path.with_name(f"damaged-{path.name}")
    out.write_bytes(data)
    return out


def test_damaged_audio_costs_its_own_steps_and_never_the_video(recipe, frames, tmp_path):
    path = damaged(write_av_clip(tmp_path / "clip.mp4", frames, burst_signal(44100, 2), 44100), (1.0, 2.0))
    stamps, got = heard(path, recipe)
    assert len(stamps) == SECONDS * FPS  # every video frame
    assert got.has_audio[stamps < 0.9].all() and got.has_audio[stamps > 2.1].all()
    assert not got.has_audio[(stamps > 1.15) & (stamps < 1.85)].any()
    assert got.track.codec == "aac" and got.track.note.startswith("undecodable audio at 1.0"), got.track


def test_a_sampled_frame_hears_its_own_window_of_the_track(recipe, frames, tmp_path):
    """Windows of 0.6 s: three steps' worth, centred on each frame; the burst spreads to the neighbours."""
    wide = dataclasses.replace(recipe, audio_window=0.6)
    path = write_av_clip(tmp_path / "clip.mp4", frames, burst_signal(44100, 2), 44100)
    stamps, got = heard(path, wide)
    np.testing.assert_allclose(got.audio, reference_steps(path, wide, stamps), rtol=1e-4, atol=1e-3)
    loud = loud_steps(got.audio, got.has_audio, wide, burst_frequency(44100))
    assert burst_steps(stamps, 0.6) <= loud <= may_hear_burst(stamps, 0.6), loud


def test_egemaps_steps_are_opensmiles_descriptors_of_the_same_samples(recipe, frames, tmp_path):
    kind = AUDIO_FEATURES["egemaps"]
    egemaps = dataclasses.replace(recipe, audio_features="egemaps", audio_frame=kind.frame, audio_bands=0,
                                  audio_dim=2 * kind.values)
    path = write_av_clip(tmp_path / "clip.mp4", frames, burst_signal(44100, 2), 44100)
    stamps, got = heard(path, egemaps)
    start, signal, video_start = decoded_track(path, egemaps.audio_rate)
    table = Egemaps(egemaps).smile.process_signal(signal.astype(np.float32), egemaps.audio_rate)
    starts = table.index.get_level_values("start").total_seconds().to_numpy()
    ends = table.index.get_level_values("end").total_seconds().to_numpy()
    centres = start - video_start + (starts + ends) / 2
    descriptors = table.to_numpy()
    for step, t in enumerate(stamps):
        inside = descriptors[(centres >= t - egemaps.audio_window / 2 - EDGE)
                             & (centres < t + egemaps.audio_window / 2 - EDGE)]
        expected = np.concatenate([inside.mean(axis=0), inside.std(axis=0)])
        np.testing.assert_allclose(got.audio[step], expected, rtol=1e-4, atol=1e-4, err_msg=f"step {step}")
    loudness = got.audio[:, 0]  # eGeMAPS' first descriptor
    assert loudness[sorted(burst_steps(stamps, egemaps.audio_window))].min() > 2 * np.median(loudness)


@pytest.fixture(scope="module")
def av_sets(tmp_path_factory, frames, extraction_weights) -> Path:
    """Three real clips (a voice, none, a track of another codec) extracted twice: with the voice (`heard/`) and
    without (`mute/`)."""
    root = tmp_path_factory.mktemp("av")
    clips = {"with-voice": write_av_clip(root / "a.mp4", frames, burst_signal(48000, 2), 48000),
             "mute": write_av_clip(root / "b.mp4", frames, None),
             "mp3": write_av_clip(root / "c.mp4", frames[:40], burst_signal(44100, 2, 1.6), 44100, "mp3")}
    write_manifest([ClipEntry(clip_id, path, "happy", "train") for clip_id, path in clips.items()], root / "m.csv")
    for name, audio in (("heard", "logmel"), ("mute", "none")):
        status, _, stderr = run_cli("extract", "--split", "train", "--manifest", root / "m.csv", "--out", root / name,
                                    "--context-backbone", "mobilenet_v2", "--device", "cpu", "--audio-features", audio)
        assert status == 0, stderr
    return root


def test_extraction_stores_the_voice_beside_the_faces_and_validate_accepts_it(recipe, av_sets, networks):
    assert validate(av_sets / "heard" / "train") == []
    with open_features(av_sets / "heard" / "train") as features:
        assert FeatureRecipe.from_attrs(features.attrs) == recipe
        voiced, mute = features["with-voice"], features["mute"]
    assert voiced["audio_track"] == AudioTrack("aac", 48000, 2, "") and voiced["has_audio"].all()
    assert mute["audio_track"] == AudioTrack(note="no audio track") and not mute["has_audio"].any()
    entry = ClipEntry("with-voice", av_sets / "a.mp4", "happy", "train")
    again = next(embed_clips([entry], networks, recipe, 16))
    np.testing.assert_array_equal(voiced["audio"], again.audio)


def test_the_voice_added_to_a_set_made_without_it_is_the_voice_of_an_extraction_that_heard(av_sets, tmp_path):
    added = tmp_path / "added"
    status, stdout, stderr = run_cli("features", "add-audio", av_sets / "mute" / "train", "--out", added,
                                     "--manifest", av_sets / "m.csv")
    assert status == 0, stderr
    assert "0 of 1 shards done before; adding the voice to 3 clips" in stdout
    assert validate(added) == []
    assert_same_clips(read_all(added), read_all(av_sets / "heard" / "train"))  # every array, bit for bit
    with open_features(added) as with_voice, open_features(av_sets / "heard" / "train") as heard:
        assert comparable(with_voice.attrs, heard.attrs) == []
    stamps = {path: path.stat().st_mtime_ns for path in added.glob("*.h5")}
    status, stdout, _ = run_cli("features", "add-audio", av_sets / "mute" / "train", "--out", added,
                                "--manifest", av_sets / "m.csv")
    assert status == 0 and "1 of 1 shards done before" in stdout
    assert {path: path.stat().st_mtime_ns for path in added.glob("*.h5")} == stamps


def test_a_clip_whose_video_cannot_be_found_or_is_another_keeps_its_features_without_a_voice(av_sets, tmp_path):
    entries = read_manifest(av_sets / "m.csv")
    other = write_av_clip(tmp_path / "other.mp4", moving_face("rocket", frames=20), np.stack([tone(300, 0.8, 44100)] * 2))
    moved = [dataclasses.replace(entry, path=other) if entry.clip_id == "mp3" else entry
             for entry in entries if entry.clip_id != "mute"]
    write_manifest(moved, tmp_path / "m.csv")
    status, _, stderr = run_cli("features", "add-audio", av_sets / "mute" / "train", "--out", tmp_path / "added",
                                "--manifest", tmp_path / "m.csv")
    assert status == 0, stderr
    clips, before = read_all(tmp_path / "added"), read_all(av_sets / "mute" / "train")
    assert clips["mute"]["audio_track"].note == "no video for the clip in the manifest"
    assert clips["mp3"]["audio_track"].note.startswith(f"{other} is not the video that was extracted (0.80 s")
    for clip_id in ("mute", "mp3"):
        assert not clips[clip_id]["has_audio"].any() and not clips[clip_id]["audio"].any()
        for name in ("face", "context", "timestamps", "has_face"):
            np.testing.assert_array_equal(clips[clip_id][name], before[clip_id][name])
    assert clips["with-voice"]["has_audio"].all()


def test_a_set_that_hears_already_is_not_given_a_second_voice(av_sets, tmp_path):
    status, _, stderr = run_cli("features", "add-audio", av_sets / "heard" / "train", "--out", tmp_path / "again",
                                "--manifest", av_sets / "m.csv")
    one_line_error(status, stderr, str(av_sets / "heard" / "train"), "holds the voice already")


def test_features_without_the_voice_and_with_it_are_never_mixed(recipe, frames, tmp_path):
    entries = [ClipEntry("c", write_av_clip(tmp_path / "c.mp4", frames[:10], None), "happy", "train")]
    write_manifest(entries, tmp_path / "m.csv")
    common = ("extract", "--split", "train", "--manifest", tmp_path / "m.csv", "--out", tmp_path / "features",
              "--context-backbone", "mobilenet_v2", "--device", "cpu")
    assert run_cli(*common, "--audio-features", "none")[0] == 0
    entries.append(ClipEntry("d", write_av_clip(tmp_path / "d.mp4", frames[:10], None), "happy", "train"))
    write_manifest(entries, tmp_path / "m.csv", replace=True)
    status, _, stderr = run_cli(*common)
    one_line_error(status, stderr, "audio_features: 'none' != 'logmel'", "features add-audio")


def test_recipes_differing_only_in_audio_share_their_loaded_networks(recipe):
    assert NetworkChoice.of(recipe, "cpu") == NetworkChoice.of(dataclasses.replace(recipe, audio_features="none"), "cpu")
