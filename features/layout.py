"""Where feature sets live: ROOT/SPLIT/ holds a split's shards and what the extractor says of them (light: no h5py)."""

import re
from pathlib import Path

DEFAULT_ROOT = Path("outputs/features")
# Beside the shards of a folder, the extractor lists the clips it could not extract, one row
# each (clip_id, path, stage, error, file_stamp).
FAILURES_FILE = "failures.csv"
# A part of a split extracted on its own (extract --num-shards N --shard-index I): ROOT/SPLIT/part-I-of-N/.
PART_FOLDER = "part-{index}-of-{count}"
PART_FOLDER_NAME = re.compile(r"part-\d+-of-\d+")
