"""A clip's stored voice as a picture: one column per sampled frame, so that it lies on the time axis of the
frames; used by the report's contact sheets and by `predict --explain`.

Both kinds of audio features store, per sampled frame, the means of their analysis frames' values and then
their standard deviations; the picture shows the means, the first value in the bottom row. Log-mel bands
share one unit (log power), so they share one scale, from silence (the extractor's floor, black) to the
clip's loudest band (bright): a loud moment is a bright column, a voice's pitch and formants bright rows.
Other features (eGeMAPS' descriptors: loudness, pitch, formant frequencies...) each have a unit of their
own, so each row is scaled to its own range over the clip. Frames without audio are grey.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from matplotlib import colormaps

from extract.audio import LOG_FLOOR
from features.schema import AudioTrack, ClipFeatures

# Dark to bright with its lightness rising all the way, so a louder frame is a brighter one, on screen and in print;
# no colour of it is a neutral grey.
COLOUR_MAP = "magma"
NO_AUDIO_COLOUR = (150, 150, 150)
SILENCE = float(np.log(LOG_FLOOR))  # a log-mel band of a silent window, as the extractor stores it
LEVELS = 255


@dataclass(frozen=True)
class Voice:
    """A clip's stored voice: per sampled frame its audio features and whether any audio covered it; its track."""

    audio: np.ndarray  # (T, audio_dim): the means, then the standard deviations
    has_audio: np.ndarray  # (T,) bool; where false the row is zeros
    bands: int  # the recipe's audio_bands: mel bands, 0 for features that are not a spectrum
    track: AudioTrack | None = None

    @classmethod
    def of(cls, clip: ClipFeatures, bands: int) -> Voice | None:
        """The voice of an extracted clip; None when its recipe does not hear."""
        return None if clip.audio is None else cls(clip.audio, clip.has_audio, bands, clip.audio_track)

    @property
    def means(self) -> np.ndarray:
        """(T, values): the mean of each value over each frame's window."""
        return np.asarray(self.audio, np.float64)[:, : np.shape(self.audio)[1] // 2]

    @property
    def heard(self) -> np.ndarray:
        return np.asarray(self.has_audio, bool)

    def scale(self) -> str:
        """How the picture's brightness reads, one line (with the track's note, from the file, where nothing was
        heard)."""
        if not self.heard.any():
            why = f" ({self.track.note})" if self.track is not None and self.track.note else ""
            return f"no audio in this clip{why}: every frame grey"
        if self.bands:
            return (f"{self.bands} mel bands, low to high; black: silence (log power {SILENCE:.1f}), brightest:"
                    f" the clip's loudest ({loudest(self.means, self.heard):.1f}); grey: no audio")
        return (f"{self.means.shape[1]} values, the first at the bottom, each from its lowest (dark) to its highest"
                " (bright) in this clip; grey: no audio")


def voice_colours(voice: Voice) -> np.ndarray:
    """(values, T, 3) uint8 RGB: column t is frame t, the first value in the bottom row; grey where no audio."""
    means, heard = voice.means, voice.heard
    shares = spectrum_shares(means, heard) if voice.bands else own_range_shares(means, heard)
    colours = (colormaps[COLOUR_MAP](shares)[..., :3] * LEVELS).round().astype(np.uint8)
    colours[~heard] = NO_AUDIO_COLOUR
    return np.ascontiguousarray(colours.transpose(1, 0, 2)[::-1])


def spectrum_shares(means: np.ndarray, heard: np.ndarray) -> np.ndarray:
    """Each value from silence (0) to the clip's loudest heard value (1). Values that are not numbers (a crafted
    shard's) are shown as silence."""
    with np.errstate(invalid="ignore"):
        shares = (means - SILENCE) / (loudest(means, heard) - SILENCE)
    return np.nan_to_num(np.clip(shares, 0, 1), nan=0.0)


def loudest(means: np.ndarray, heard: np.ndarray) -> float:
    """The clip's loudest heard band (numbers only), and at least a little above silence, so a scale from silence
    to it is never empty."""
    return float(means.max(initial=SILENCE + 1, where=np.isfinite(means) & heard[:, None]))


def own_range_shares(means: np.ndarray, heard: np.ndarray) -> np.ndarray:
    """Each value from its lowest (0) to its highest (1) over the clip's heard frames; a value that never changes is
    shown halfway."""
    usable = np.isfinite(means) & heard[:, None]
    low = means.min(axis=0, initial=np.inf, where=usable)
    high = means.max(axis=0, initial=-np.inf, where=usable)
    spread = high - low
    varies = np.isfinite(spread) & (spread > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        shares = np.where(varies, (means - low) / np.where(varies, spread, 1), 0.5)
    return np.nan_to_num(np.clip(shares, 0, 1), nan=0.0)
