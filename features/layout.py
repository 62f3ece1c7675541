"""Where feature sets live: ROOT/SPLIT/ holds a split's shards and what the extractor says of them (light: no h5py)."""

from pathlib import Path

DEFAULT_ROOT = Path("outputs/features")
# Beside the shards of a folder, the extractor lists the clips it could not extract, one row
# each (clip_id, path, stage, error, file_stamp).
FAILURES_FILE = "failures.csv"
