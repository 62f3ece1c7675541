"""Stage 1's ear: a clip's audio track, read in the pass that decodes its video, as features per sampled frame.

The track's packets come out of the demuxer beside the video's (extract/video.py hands them to a
`TrackReader`); each is decoded with PyAV, mixed to mono and resampled to the recipe's rate, and
cut into analysis frames as it streams. Log-mel frames (the default) keep only their features
(64 values every 10 ms: 26 KB a second of audio), never the samples, so memory follows the
clip's features, as for video. eGeMAPS (openSMILE, an optional extra) keeps the resampled
samples of the track (64 KB a second at 16 kHz) until the clip ends: openSMILE smooths its
descriptors over the whole signal.

- **Log-mel** (`logmel`): frames of `audio_frame` seconds (a Hann window) every `audio_hop`,
  centred on the frame's time, the signal padded with zeros at the start and end of the track
  (as librosa's `center=True`); power spectrum, librosa's mel filterbank of `audio_bands` bands
  (Slaney, 0 to rate/2 Hz), natural log (floored at 1e-10). A track's frames equal
  `np.log(np.maximum(librosa.feature.melspectrogram(y, sr, n_fft, hop, win_length, center=True,
  pad_mode="constant", n_mels=bands), 1e-10))` of its samples, n_fft being the frame's length
  rounded up to a power of two. librosa was chosen as the field's reference implementation:
  its definition of a mel spectrogram is the one other tools reproduce, it installs beside any
  torch (torchaudio's releases stopped at torch 2.11), and only its filterbank and window are
  used here, so the streaming is ours.
- **eGeMAPS** (`egemaps`): openSMILE's eGeMAPSv02 low-level descriptors (25: loudness,
  pitch, jitter, shimmer, formants...) every 10 ms. openSMILE is audEERING's, under its
  research licence (free for non-commercial use; products need a commercial licence).

Each sampled video frame at time t gets the mean and standard deviation of the analysis
frames whose centres lie in [t - W/2, t + W/2), W = `audio_window` (by default the frame
step, so the windows tile the clip): 2 x 64 = 128 values for log-mel, 50 for eGeMAPS.
`has_audio` is true where an analysis frame lies within one hop of t; elsewhere (no track, a
track that starts late or ends early, audio that could not be read) the row is zeros.

Times: a video's frame times count from its first frame (extract/video.py); the audio's are
taken from its own presentation times and brought to that origin, so a track that starts
later or earlier than the video, or in another time base, lands where it plays. A jump in the
audio's times (a gap, damaged packets skipped) starts a new stretch of frames there.

An audio problem never fails the clip: a track that cannot be decoded, or damaged packets,
leave `has_audio` false where the audio was not read, and the clip's `AudioTrack.note` says why.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from fractions import Fraction

import av
import numpy as np

from features.recipe import FeatureRecipe
from features.schema import NO_TRACK, AudioTrack

logger = logging.getLogger(__name__)

LOG_FLOOR = 1e-10
# Windows' edges fall on analysis frames' centres (steps and hops are round numbers of seconds): a
# centre within this many seconds of an edge counts as on it, so rounding never decides which
# window it joins. A window is [t - W/2, t + W/2).
EDGE = 1e-6
# Analysis frames are computed once this many seconds of samples have come (a few hundred frames in one
# FFT call), and at a stretch's end.
BATCH_SECONDS = 1.0
# A stretch of audio starts anew where its times jump by more than this many hops from the samples
# decoded so far.
GAP_HOPS = 1


@dataclass(frozen=True)
class Heard:
    """A clip's voice as a shard stores it: per sampled frame, its audio features and whether any audio covered
    it; and its track."""

    audio: np.ndarray  # (T, audio_dim) float32, zero rows where has_audio is false
    has_audio: np.ndarray  # (T,) bool
    track: AudioTrack


@dataclass(frozen=True)
class ClipAudio:
    """What a clip's track gave: its analysis frames (centres in video time, sorted) and what the track is."""

    centres: np.ndarray  # (M,) seconds from the video's first frame
    features: np.ndarray  # (M, F) float32
    track: AudioTrack

    def steps(self, timestamps: np.ndarray, window: float, hop: float) -> tuple[np.ndarray, np.ndarray]:
        """Per sampled frame at `timestamps`: the mean and standard deviation of the analysis frames whose centres
        lie in [t - window/2, t + window/2), (T, 2F) float32 with zero rows where no audio lies within one hop of
        t; and that mask, `has_audio` (T,)."""
        timestamps = np.asarray(timestamps, np.float64)
        out = np.zeros((len(timestamps), 2 * self.features.shape[1]), np.float32)
        if not len(self.centres):
            return out, np.zeros(len(timestamps), bool)
        first = np.searchsorted(self.centres, timestamps - window / 2 - EDGE, side="left")
        last = np.searchsorted(self.centres, timestamps + window / 2 - EDGE, side="left")
        nearest = np.clip(np.searchsorted(self.centres, timestamps), 1, len(self.centres) - 1)
        gaps = np.minimum(np.abs(self.centres[nearest - 1] - timestamps), np.abs(self.centres[nearest] - timestamps))
        if len(self.centres) == 1:
            gaps = np.abs(self.centres[0] - timestamps)
        has_audio = (gaps <= hop + 1e-9) & (last > first)
        for step in np.flatnonzero(has_audio):
            frames = self.features[first[step]:last[step]].astype(np.float64)
            out[step] = np.concatenate([frames.mean(axis=0), frames.std(axis=0)])
        return out, has_audio


class LogMel:
    """Streaming log-mel frames of one stretch (librosa's `center=True` framing, constant padding)."""

    def __init__(self, recipe: FeatureRecipe):
        import librosa.filters
        import librosa.util
        import scipy.sparse

        self.rate = recipe.audio_rate
        self.hop = round(recipe.audio_hop * self.rate)
        length = round(recipe.audio_frame * self.rate)
        self.n_fft = 1 << (length - 1).bit_length()
        window = librosa.filters.get_window("hann", length, fftbins=True)
        self.window = librosa.util.pad_center(window, size=self.n_fft).astype(np.float64)
        # Sparse, as each band spans a few FFT bins: a sixth of the work, and no BLAS call, whose threads would
        # contend with the networks' (measured: extraction took 1.28x its time without audio, then 1.06x).
        mel = librosa.filters.mel(sr=self.rate, n_fft=self.n_fft, n_mels=recipe.audio_bands)
        self.mel = scipy.sparse.csr_matrix(mel.astype(np.float64))
        self.width = recipe.audio_bands  # values per analysis frame

    def start(self) -> None:
        """A new stretch: half a frame of zeros before its first sample, as `center=True` pads."""
        self.buffer = np.zeros(self.n_fft // 2, np.float64)
        self.pending: list[np.ndarray] = []  # samples not yet framed: framed in batches, which numpy does faster
        self.waiting = 0
        self.made = 0  # frames of the stretch so far

    def add(self, samples: np.ndarray, last: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """The frames `samples` complete: (their centres in seconds from the stretch's first sample, features);
        with `last`, the stretch ends and its final frames are padded with zeros. Samples wait until a batch of
        BATCH_SECONDS has come."""
        self.pending.append(samples)
        self.waiting += len(samples)
        if self.waiting < BATCH_SECONDS * self.rate and not last:
            return np.zeros(0), np.zeros((0, self.width), np.float32)
        self.buffer = np.concatenate([self.buffer, *self.pending, np.zeros(self.n_fft // 2) if last else []])
        self.pending, self.waiting = [], 0
        count = max(0, (len(self.buffer) - self.n_fft) // self.hop + 1)
        if not count:
            return np.zeros(0), np.zeros((0, self.width), np.float32)
        frames = np.lib.stride_tricks.sliding_window_view(self.buffer, self.n_fft)[::self.hop][:count]
        power = np.abs(np.fft.rfft(frames * self.window, n=self.n_fft, axis=1)) ** 2
        features = np.log(np.maximum((self.mel @ power.T).T, LOG_FLOOR)).astype(np.float32)
        centres = np.arange(self.made, self.made + count) * self.hop / self.rate
        self.made += count
        self.buffer = self.buffer[count * self.hop:]
        return centres, features


class Egemaps:
    """eGeMAPSv02 low-level descriptors of one stretch, computed when it ends (openSMILE needs the whole signal)."""

    def __init__(self, recipe: FeatureRecipe):
        try:
            import opensmile
        except ImportError:
            raise AudioUnavailable("--audio-features egemaps needs openSMILE: pip install 'caca-rnn[egemaps]'"
                                   " (audEERING's research licence: free for non-commercial use)") from None
        self.rate = recipe.audio_rate
        self.width = len(EGEMAPS_DESCRIPTORS)
        self.smile = opensmile.Smile(feature_set=opensmile.FeatureSet.eGeMAPSv02,
                                     feature_level=opensmile.FeatureLevel.LowLevelDescriptors)

    def start(self) -> None:
        self.samples: list[np.ndarray] = []

    def add(self, samples: np.ndarray, last: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(centre times in seconds from the stretch's start, features) once the stretch ends; nothing before."""
        self.samples.append(samples.astype(np.float32))
        signal = np.concatenate(self.samples) if last else np.zeros(0)  # joined once, at the stretch's end
        if not len(signal):
            return np.zeros(0), np.zeros((0, self.width), np.float32)
        table = self.smile.process_signal(signal, self.rate)
        starts = table.index.get_level_values("start").total_seconds().to_numpy()
        ends = table.index.get_level_values("end").total_seconds().to_numpy()
        return (starts + ends) / 2, table.to_numpy(np.float32)


# eGeMAPSv02's low-level descriptors, as openSMILE names them.
EGEMAPS_DESCRIPTORS = (
    "Loudness", "alphaRatio", "hammarbergIndex", "slope0-500", "slope500-1500", "spectralFlux", "mfcc1", "mfcc2",
    "mfcc3", "mfcc4", "F0semitoneFrom27.5Hz", "jitterLocal", "shimmerLocaldB", "HNRdBACF", "logRelF0-H1-H2",
    "logRelF0-H1-A3", "F1frequency", "F1bandwidth", "F1amplitudeLogRelF0", "F2frequency", "F2bandwidth",
    "F2amplitudeLogRelF0", "F3frequency", "F3bandwidth", "F3amplitudeLogRelF0",
)


class AudioUnavailable(Exception):
    """The recipe's audio features need a package this machine lacks; the message says which."""


FRAMERS = {"logmel": LogMel, "egemaps": Egemaps}


def framer_for(recipe: FeatureRecipe):
    """What makes the analysis frames of `recipe`'s audio features, once per process and clip run."""
    return FRAMERS[recipe.audio_features](recipe)


class TrackReader:
    """One clip's audio track, fed packet by packet while its video decodes (extract.video.sample_frames)."""

    def __init__(self, recipe: FeatureRecipe, framer=None):
        """`framer`: the analysis frames' maker (one per process serves every clip: LogMel, Egemaps)."""
        self.recipe = recipe
        self.framer = framer or framer_for(recipe)
        # Per stretch: its first sample's time on the container's clock, its frames' centres and features.
        self.stretches: list[tuple[float, list[np.ndarray], list[np.ndarray]]] = []
        self.stretch_start: float | None = None
        self.received = 0  # resampled samples of the current stretch
        self.track = AudioTrack(note=NO_TRACK)
        self.stream = None
        self.problems: list[str] = []
        self.video_origin = 0.0

    def open(self, container) -> object | None:
        """The container's audio stream to demux with the video, or None when it has none it can decode."""
        if not container.streams.audio:
            return None
        stream = container.streams.audio[0]
        try:
            codec = stream.codec_context.codec.canonical_name or ""  # "mp3", not its decoder's "mp3float"
            self.track = AudioTrack(codec=codec, rate=int(stream.rate or 0), channels=int(stream.channels or 0))
        except (av.FFmpegError, ValueError, AttributeError) as exc:
            self.track = AudioTrack(note=f"audio codec unknown here ({exc})")
            return None
        self.stream = stream
        return stream

    def set_video_origin(self, seconds: float) -> None:
        """The container-clock time of the video's first frame, from which every frame time counts."""
        self.video_origin = seconds

    def feed(self, packet) -> None:
        """Decode one packet of the track; damage costs its samples, anything else the rest of the track, never the
        clip."""
        try:
            self.decode(packet)
        except Exception as exc:  # this toolkit's own failure on an odd track: said, and the video goes on
            logger.info("audio of %s not read further", self.stream, exc_info=exc)
            self.stop(f"audio not read further ({type(exc).__name__}: {exc})")

    def stop(self, reason: str) -> None:
        """Read no more of the track (what was read stays), and say why."""
        self.problems.append(reason)
        self.end_stretch()
        self.stream = None

    def decode(self, packet) -> None:
        if self.stream is None:
            return
        at = packet.pts * packet.time_base if packet.pts is not None else None
        if packet.is_corrupt:
            self.problems.append(f"damaged audio at {self.shown_time(at)}")
            return
        try:
            frames = packet.decode()
        except av.FFmpegError as exc:
            self.problems.append(f"undecodable audio at {self.shown_time(at)} ({exc.strerror or exc})")
            return
        for frame in frames:
            self.add_frame(frame)

    def shown_time(self, at: Fraction | None) -> str:
        return "an unknown time" if at is None else f"{float(at) - self.video_origin:.2f} s"

    def add_frame(self, frame) -> None:
        at = frame.time
        if at is not None:
            expected = None if self.stretch_start is None else self.stretch_start + self.received / self.recipe.audio_rate
            if expected is None or abs(at - expected) > GAP_HOPS * self.recipe.audio_hop:
                self.end_stretch()
                self.begin_stretch(at)
        elif self.stretch_start is None:
            self.begin_stretch(self.video_origin)  # a track without times is taken to start with the video
        try:
            resampled = self.resampler.resample(frame)
        except (av.FFmpegError, ValueError) as exc:
            self.problems.append(f"audio that could not be resampled ({exc})")
            return
        self.take(resampled)

    def begin_stretch(self, at: float) -> None:
        self.stretch_start, self.received = at, 0
        self.resampler = av.AudioResampler(format="dbl", layout="mono", rate=self.recipe.audio_rate)
        self.framer.start()
        self.stretches.append((at, [], []))

    def take(self, frames, last: bool = False) -> None:
        """Hand resampled `frames` to the framer, and keep the analysis frames they complete."""
        for frame in frames:
            samples = frame.to_ndarray()[0]
            self.received += len(samples)
            self.keep(*self.framer.add(samples))
        if last:
            self.keep(*self.framer.add(np.zeros(0), last=True))

    def keep(self, centres: np.ndarray, features: np.ndarray) -> None:
        if len(centres):
            _, all_centres, all_features = self.stretches[-1]
            all_centres.append(centres)
            all_features.append(features)

    def end_stretch(self) -> None:
        if self.stretch_start is None:
            return
        try:
            tail = self.resampler.resample(None)
        except (av.FFmpegError, ValueError):
            tail = []
        self.take(tail, last=True)
        self.stretch_start = None

    def heard(self, timestamps: list[float]) -> Heard:
        """The clip's voice at its sampled frames' `timestamps` (video time), once the whole clip was demuxed."""
        try:
            clip = self.finish()
        except Exception as exc:  # as in `feed`
            logger.info("audio analysis failed", exc_info=exc)
            clip = ClipAudio(np.zeros(0), np.zeros((0, self.framer.width), np.float32),
                             AudioTrack(self.track.codec, self.track.rate, self.track.channels,
                                        f"audio not analysed ({type(exc).__name__}: {exc})"))
        audio, has_audio = clip.steps(np.asarray(timestamps), self.recipe.audio_window, self.recipe.audio_hop)
        return Heard(audio, has_audio, clip.track)

    def finish(self) -> ClipAudio:
        """The track's analysis frames in video time, once the whole clip was demuxed."""
        if self.stream is not None:  # the demuxer's last, empty packet has flushed the decoder
            self.end_stretch()
        centres, features = [], []
        for start, times, values in self.stretches:
            centres.append(start + (np.concatenate(times) if times else np.zeros(0)) - self.video_origin)
            features.append(np.concatenate(values) if values else np.zeros((0, 0), np.float32))
        width = self.framer.width
        features = [f.reshape(len(c), width) for c, f in zip(centres, features)]
        centres = np.concatenate(centres) if centres else np.zeros(0)
        features = np.concatenate(features) if features else np.zeros((0, width), np.float32)
        order = np.argsort(centres, kind="stable")
        track = self.track
        if self.problems:
            more = f" (and {len(self.problems) - 1} more)" if len(self.problems) > 1 else ""
            track = AudioTrack(track.codec, track.rate, track.channels, f"{self.problems[0]}{more}")
        elif track.codec and not len(centres):
            track = AudioTrack(track.codec, track.rate, track.channels, "no decodable audio")
        return ClipAudio(centres[order], features[order].astype(np.float32), track)
