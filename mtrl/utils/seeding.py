"""Seeds derived from names, so that a random draw belongs to a sample rather than to a worker.

A per-sample seed depends only on the run's seed, the step and the sample's uid: the same sample gets
the same draws whichever worker handles it, in whatever micro-batch, in a resumed run too.
"""

import hashlib


def sample_seed(seed: int, step: int, uid: str) -> int:
    """A 63-bit seed from (seed, step, uid), the same on every worker and every run."""
    digest = hashlib.sha256(f"{seed}:{step}:{uid}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF
