"""Everything about checkpoints.

format.py     layout, names, versions, the manifest, what makes a checkpoint valid
store.py      the checkpoints below one root: list, read and verify, commit
retention.py  what is deleted, when, and in which order
staging.py    host buffers a save is copied into
persister.py  the background persist (one writer, or every rank's shard)
dcp.py        shard files through torch.distributed.checkpoint (--parallel fsdp): writing
dcp_read.py   reading them, resharded, and assembling whole tensors in one process
resume.py     which checkpoint a run resumes from, and loading it
rules.py      what may change on resume (one table)
policy.py     when to save and what: the loop's one call per step
"""

from .format import (
    FORMAT_VERSION,
    MANIFEST,
    SHARDED_FORMAT,
    CorruptCheckpoint,
    Entry,
    FileEntry,
    Loaded,
    Manifest,
    TrainState,
    step_dirname,
)
from .persister import Checkpointer, SaveTimeout, ShardedCheckpointer
from .store import CheckpointStore, load_uri, open_uri

__all__ = ["FORMAT_VERSION", "MANIFEST", "SHARDED_FORMAT", "Checkpointer", "CheckpointStore",
           "CorruptCheckpoint", "Entry", "FileEntry", "Loaded", "Manifest", "SaveTimeout",
           "ShardedCheckpointer", "TrainState", "load_uri", "open_uri", "step_dirname"]
