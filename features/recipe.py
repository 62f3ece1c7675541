"""How a feature set was made: the settings that decide whether two sets are comparable (light: no h5py).

A shard stores its recipe as root attributes of the same names (features/README.md,
"Attributes"); two sets whose recipes differ are never mixed, compared or predicted with.
Adding a setting of the features means a field here (and its line in the README).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

# Settings recorded only since a later extractor, with the value every shard written before
# them was made with: a shard without the attribute is read as having that value.
SETTING_DEFAULTS = {"precision": "float32", "detect_every": 1}
# How context features may be stored (a recipe's context_dtype): float16 halves the files.
CONTEXT_DTYPES = ("float16", "float32")
# How an attribute one side lacks is shown in a difference.
MISSING = "(missing)"


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


RECIPE_ATTRS = tuple(field.name for field in fields(FeatureRecipe))


def with_setting_defaults(attrs: dict) -> dict:
    """`attrs` with SETTING_DEFAULTS filled in where a shard older than those settings lacks them."""
    return {**SETTING_DEFAULTS, **attrs}


def attr_differences(attrs_a: dict, attrs_b: dict, keys: tuple[str, ...]) -> list[str]:
    """"key: a != b" for each of `keys` whose values differ (MISSING where one side lacks it), after
    filling SETTING_DEFAULTS: the one comparison of recipes, whole or as attribute dicts."""
    attrs_a, attrs_b = with_setting_defaults(attrs_a), with_setting_defaults(attrs_b)
    differences = []
    for key in keys:
        a, b = attrs_a.get(key, MISSING), attrs_b.get(key, MISSING)
        if a != b:
            differences.append(f"{key}: {a!r} != {b!r}")
    return differences
