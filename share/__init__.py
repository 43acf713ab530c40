"""Sharing stores between teams: verification (``verify``), single-file archives (``archive``), merges
(``merge``) and the dataset card that travels with an archive (``card``).

Integrity rests on the ``checksums.json`` of every run and weights directory (``actsparse.core.checksums``).
Nothing here loads pickle, and no name read from a manifest, a checksum list or an archive is used as a path
before it has been matched against the store layout (``actsparse.core.format``).
"""

from actsparse.share.archive import pack, unpack
from actsparse.share.merge import merge
from actsparse.share.staging import ImportResult
from actsparse.share.verify import VerifyReport, rebuild_catalogue, seal, verify

__all__ = ["ImportResult", "VerifyReport", "merge", "pack", "rebuild_catalogue", "seal", "unpack", "verify"]
