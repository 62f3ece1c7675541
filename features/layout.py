"""Where feature sets live by default: ROOT/SPLIT/ holds a split's shards (light: no h5py)."""

from pathlib import Path

DEFAULT_ROOT = Path("outputs/features")
