"""The feature-file format both stages share: see features/README.md for the written schema.

The names below load their modules (and h5py) on first use, so the light modules of this
package (`features.labels`, `features.layout`) can be imported by a command line that must
start at once.
"""

from importlib import import_module

_HOMES = {
    "FeatureSet": "features.reader",
    "open_features": "features.reader",
    "write_index": "features.reader",
    "COMPARABILITY_KEYS": "features.schema",
    "ClipFeatures": "features.schema",
    "FeatureFileError": "features.schema",
    "comparable": "features.schema",
    "ShardWriter": "features.writer",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'features' has no attribute {name!r}")
    return getattr(import_module(_HOMES[name]), name)
