"""How a feature set was made: the settings that decide whether two sets are comparable (light: no h5py).

A shard stores its recipe as root attributes of the same names (features/README.md,
"Attributes"); two sets whose recipes differ are never mixed, compared or predicted with.
Adding a setting of the features means a field here (and its line in the README).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from devices import PRECISIONS
from values import are_distinct_names, is_int, is_number, is_positive_number, problems_of, shown

# Settings recorded only since a later version of this toolkit, with the value everything written
# before them was made with: a shard's attribute, or a run's setting in its config.json
# (train/config.py), that is absent is read as having that value. Both precisions, the frozen
# CNNs' and training's, were float32 before they were recorded.
SETTING_DEFAULTS = {
    "precision": "float32", "detect_every": 1,
    # Shards made before the audio stream have none: every audio setting of a recipe without audio is 0.
    "audio_features": "none", "audio_rate": 0, "audio_frame": 0.0, "audio_hop": 0.0, "audio_bands": 0,
    "audio_window": 0.0, "audio_dim": 0,
}
# The audio_features of a recipe without audio, whose other audio settings are all 0.
NO_AUDIO = "none"
# How context features may be stored (a recipe's context_dtype): float16 halves the files.
CONTEXT_DTYPES = ("float16", "float32")
# The largest context feature a reader accepts; the largest backbone on offer gives 25,088.
MAX_CONTEXT_DIM = 1 << 18
# The largest audio feature a reader accepts (log-mel statistics of 64 bands give 128).
MAX_AUDIO_DIM = 1 << 12
AUDIO_SETTINGS = ("audio_rate", "audio_frame", "audio_hop", "audio_bands", "audio_window", "audio_dim")
# The audio settings of a recipe without audio.
# Every audio field of a recipe: which features, and their settings.
AUDIO_FIELDS = ("audio_features", *AUDIO_SETTINGS)
NO_AUDIO_SETTINGS = {key: SETTING_DEFAULTS[key] for key in AUDIO_FIELDS}
# How an attribute one side lacks is shown in a difference.
MISSING = "(missing)"
# What each setting of a recipe may hold, whichever extractor made it: readers compute with these
# values, and the command line's options are checked by the same rules (`value_problems`).
# Which networks a recipe may name is the extractor's to say (extract.settings.recipe_problems).
RECIPE_VALUES = {
    "fps": (is_positive_number, "a positive number"),
    "detector_threshold": (lambda value: is_positive_number(value) and value < 1, "a number between 0 and 1"),
    "detect_every": (lambda value: is_int(value) and value >= 1, "an int of 1 or more"),
    "context_dim": (lambda value: is_int(value) and 1 <= value <= MAX_CONTEXT_DIM, f"an int from 1 to {MAX_CONTEXT_DIM}"),
    "context_dtype": (lambda value: value in CONTEXT_DTYPES, f"one of {', '.join(CONTEXT_DTYPES)}"),
    "precision": (lambda value: value in PRECISIONS, f"one of {', '.join(PRECISIONS)}"),
    "classes": (are_distinct_names, "a list of distinct non-empty strings"),
    "audio_features": (lambda value: isinstance(value, str) and value != "", "a name"),
    "audio_rate": (lambda value: is_int(value) and 0 <= value <= 384_000, "an int from 0 to 384000"),
    "audio_frame": (lambda value: is_number(value) and 0 <= value <= 1, "a number of seconds from 0 to 1"),
    "audio_hop": (lambda value: is_number(value) and 0 <= value <= 1, "a number of seconds from 0 to 1"),
    "audio_bands": (lambda value: is_int(value) and 0 <= value <= MAX_AUDIO_DIM, f"an int from 0 to {MAX_AUDIO_DIM}"),
    "audio_window": (lambda value: is_number(value) and 0 <= value <= 60, "a number of seconds from 0 to 60"),
    "audio_dim": (lambda value: is_int(value) and 0 <= value <= MAX_AUDIO_DIM, f"an int from 0 to {MAX_AUDIO_DIM}"),
}


@dataclass(frozen=True)
class FeatureRecipe:
    """Everything that decides the values of the features, in the order the extractor writes them.

    `to_attrs()` is the attribute dict a shard stores (`context_dtype` through the writer, which
    owns that attribute) and `from_attrs()` its inverse: `from_attrs(r.to_attrs()) == r`.
    """

    fps: float
    face_crop_size: int
    face_crop_scale: float
    context_size: int
    detector: str  # the detector's weights, by registry name
    detector_weights_sha256: str
    detector_threshold: float
    detector_max_side: int
    detect_every: int  # full detection on every k-th sampled frame, tracking between; 1: the paper's
    main_face: dict  # the main-face choice's constants
    face_backbone: str  # the face CNN's weights, by registry name
    face_weights_sha256: str
    context_backbone: str
    context_weights_sha256: str
    context_dim: int
    context_pooling: str
    normalisation: dict  # each network's input normalisation, in words and numbers
    classes: list  # the class names labels are drawn from
    precision: str
    context_dtype: str
    # The voice, per sampled frame (features/README.md, "Audio"): how its track is read and summarised, or
    # NO_AUDIO with every other audio setting 0.
    audio_features: str  # the kind of features: extract.settings.AUDIO_FEATURES, or NO_AUDIO
    audio_rate: int  # Hz the track is mixed to mono and resampled to
    audio_frame: float  # seconds of one analysis frame
    audio_hop: float  # seconds between analysis frames
    audio_bands: int  # mel bands of a log-mel frame (0 for features without bands)
    audio_window: float  # seconds of audio summarised for each sampled frame, centred on it
    audio_dim: int  # values per sampled frame

    @property
    def hears(self) -> bool:
        """Whether features made by this recipe hold the voice."""
        return self.audio_features != NO_AUDIO

    def to_attrs(self) -> dict:
        return asdict(self)

    @classmethod
    def from_attrs(cls, attrs: dict) -> FeatureRecipe:
        """The recipe of a shard's (or a set's, or a run's) attributes, SETTING_DEFAULTS filled in for
        older shards; ValueError naming the attributes that are missing."""
        present = with_setting_defaults(attrs)
        missing = [key for key in RECIPE_ATTRS if key not in present]
        if missing:
            raise ValueError(f"attributes missing: {', '.join(missing)}")
        return cls(**{key: present[key] for key in RECIPE_ATTRS})

    def differences(self, other: FeatureRecipe) -> list[str]:
        """Human-readable differences ("key: a != b"); empty when features of the two can be mixed."""
        return attr_differences(self.to_attrs(), other.to_attrs(), RECIPE_ATTRS)

    def problems(self) -> list[str]:
        """`value_problems` of this recipe's settings."""
        return value_problems(self.to_attrs())


RECIPE_ATTRS = tuple(field.name for field in fields(FeatureRecipe))


def value_problems(values: dict) -> list[str]:
    """Why the recipe settings among `values` (attributes, or options) cannot be computed with; one line each."""
    return problems_of(values, RECIPE_VALUES) + audio_problems(values)


def audio_problems(values: dict) -> list[str]:
    """A recipe without audio has every audio setting 0, one with audio none 0 but its bands."""
    if any(key not in values for key in AUDIO_FIELDS):
        return []
    settings = {key: values[key] for key in AUDIO_SETTINGS}
    if values["audio_features"] == NO_AUDIO:
        wrong = [key for key, value in settings.items() if value != 0]
        return [f"{wrong[0]} {shown(settings[wrong[0]])} is not 0, as it is without audio"] if wrong else []
    wrong = [key for key, value in settings.items() if key != "audio_bands" and value == 0]
    return [f"{wrong[0]} is 0 with audio_features {shown(values['audio_features'])}"] if wrong else []


def with_setting_defaults(attrs: dict) -> dict:
    """`attrs` with SETTING_DEFAULTS filled in where a shard older than those settings lacks them."""
    return {**SETTING_DEFAULTS, **attrs}


def attr_differences(attrs_a: dict, attrs_b: dict, keys: tuple[str, ...]) -> list[str]:
    """"key: a != b" for each of `keys` whose values differ (MISSING where one side lacks it), after
    filling SETTING_DEFAULTS: the one wording of a difference of settings, of recipes (whole or as
    attribute dicts) and of training runs (train/config.py)."""
    attrs_a, attrs_b = with_setting_defaults(attrs_a), with_setting_defaults(attrs_b)
    differences = []
    for key in keys:
        a, b = attrs_a.get(key, MISSING), attrs_b.get(key, MISSING)
        if a != b:
            differences.append(f"{key}: {a!r} != {b!r}")
    return differences
