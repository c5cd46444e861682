"""The webdataset layout's commit stage: finished samples into WebDataset shards, exactly once.

Torch-free: it only moves bytes from the decode stage's rows into tar shards and index parts.
"""

from __future__ import annotations

import pickle

import pandas as pd

from ..config.job import RenderJob
from ..io.opening import open_fs
from ..io.shards import Sample, write_samples
from .rows import FILTERED, OK


class ShardWriter:
    """The webdataset layout's last stage, after decode: each batch of finished samples committed as
    shards (`kvray.io.shards.write_samples`: the tar, then its index part). One writer per run, so that a
    video two rows ask for lands in one shard; it asks for no CPU (it waits on storage)."""

    def __init__(self, job_json: str):
        self.job = RenderJob.model_validate_json(job_json)
        self.fs, self.root = open_fs(self.job.out, self.job.storage_options)
        self.committed: set[str] = set()

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        finished = batch.index[batch["status"].isin([OK, FILTERED]) & (batch["payload"].map(len) > 0)]
        if len(finished) == 0:
            return batch
        batch = batch.copy()
        samples = {i: Sample.from_row(pickle.loads(batch.at[i, "payload"])) for i in finished}
        fresh = [s for s in {s.key: s for s in samples.values()}.values() if s.key not in self.committed]
        written = write_samples(self.fs, self.root, fresh, self.job.dataset)
        shard_of = {key: shard.uri for shard in written.shards for key in shard.keys}
        for i, sample in samples.items():
            batch.at[i, "uri"] = shard_of.get(sample.key, "")
            batch.at[i, "payload"] = b""
        self.committed.update(s.key for s in fresh)
        return batch
