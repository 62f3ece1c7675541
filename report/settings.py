"""The report's defaults and the name of its page; light (no numpy, h5py or matplotlib), so that the
command line shows them at once."""

PAGE = "index.html"
DEFAULT_SAMPLE = 24  # clips drawn at random for the contact sheet
DEFAULT_FRAMES = 8  # frames shown per clip
