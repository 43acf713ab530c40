"""The core every layer may import: errors, the field's vocabulary, the store format, value codecs, checksums,
safe file writes and locks, progress reporting and command-line value parsing."""

from importlib import metadata

try:
    __version__ = metadata.version("actsparse")
except metadata.PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"
