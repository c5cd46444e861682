"""The dataset card: README.md at the root of a webdataset-layout output.

What a team training on the output needs on one page: counts, the model and request defaults, the layout,
the columns and quality signals, and code that loads it with `datasets` and streams it with `webdataset`
(the tests run that code against real outputs, local and on S3). The YAML header points the Hugging Face
hub (and `load_dataset(root)`) at the index.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import yaml
from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem

from ..config.dataset import FILTERED, SIGNALS, DatasetConfig
from .atomic import write_atomic
from .opening import uri_of
from .redaction import is_sensitive_key
from .shards import (
    DROPPED,
    INDEX,
    INDEX_SCHEMA,
    SHARDS,
    read_index,
    scan_shards,
)

CARD = "README.md"


@dataclass(frozen=True)
class DatasetCounts:
    """Samples committed under a root (every run so far), by status, and the shards holding them."""

    ok: int
    filtered: int  # kept in the shards, marked `filtered`
    dropped: int  # filtered and left out of the shards
    shards: int
    shard_bytes: int

    @property
    def samples(self) -> int:
        return self.ok + self.filtered


def dataset_counts(fs: AbstractFileSystem, root: str) -> DatasetCounts:
    """Counts read from the committed index (two listings and the status column of each part)."""
    scan = scan_shards(fs, root)
    statuses = read_index(fs, root, ["status", "shard"], parts=scan.parts).to_pylist()
    in_shards = [row["status"] for row in statuses if row["shard"] is not None]
    return DatasetCounts(
        ok=sum(s != FILTERED for s in in_shards), filtered=sum(s == FILTERED for s in in_shards),
        dropped=len(statuses) - len(in_shards), shards=len(scan.committed), shard_bytes=scan.committed_bytes,
    )


def public_storage_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """The options without anything that may hold a secret (keys, tokens, passwords): what a card may show.
    Readers bring their own credentials (the standard AWS variables, a profile, ...)."""
    return {k: public_storage_options(v) if isinstance(v, Mapping) else v
            for k, v in options.items() if not is_sensitive_key(k)}


def dataset_card(*, uri: str, counts: DatasetCounts, errors: int, dataset: DatasetConfig, model_version: str,
                 preset: str, defaults: Mapping[str, Any], video_format: str = "mp4",
                 storage_options: Mapping[str, Any] | None = None) -> str:
    """The card's Markdown. `uri`: the dataset root as readers reach it; `errors`: rows that failed (from
    the results); `defaults`: the job's request defaults; `storage_options`: shown without secrets."""
    options = public_storage_options(storage_options or {})
    header = {
        "pretty_name": f"kvray synthetic videos ({preset})",
        "tags": ["video", "text-to-video", "synthetic", "webdataset", "kvray"],
        "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": f"{INDEX}/*.parquet"}]}],
    }
    signals = "\n".join(f"| `{s.name}` | {s.unit} | {s.description} |" for s in SIGNALS.values())
    columns = ", ".join(f"`{field.name}` ({field.type})" for field in INDEX_SCHEMA)
    filters = ", ".join(f"`{f}`" for f in dataset.filters) or "none"
    fate = "kept in the shards, marked `filtered`" if dataset.keep_filtered else f"left out, listed under `{DROPPED}/`"
    return f"""---
{yaml.safe_dump(header, sort_keys=False).strip()}
---

# Synthetic videos: Kandinsky Video 1.1 ({preset})

Rendered by kvray with model version `{model_version}` (preset `{preset}`). Every sample is a video, its
caption (the prompt; a mini-movie's scenes with their times) and its metadata (the request, seed, timings,
quality signals).

| | |
|---|---|
| samples | {counts.samples} (ok {counts.ok}, filtered {counts.filtered}) |
| filtered and dropped | {counts.dropped} |
| errors (rows that did not render) | {errors} |
| shards | {counts.shards}, {counts.shard_bytes / 2**20:.1f} MiB |
| quality filters | {filters}; filtered samples {fate} |
| video | `{video_format}`{", latents (`latents.safetensors`)" if dataset.with_latents else ""} |

Request defaults (for manifest columns left empty):

```yaml
{yaml.safe_dump(dict(defaults), sort_keys=False).strip()}
```

## Layout

| path | content |
|---|---|
| `{SHARDS}/{{name}}.tar` | WebDataset shards of at most {dataset.shard_size} samples and {dataset.shard_bytes.human_readable()}; members `{{key}}.{video_format}`, `{{key}}.json` (metadata), `{{key}}.txt` (caption){", `{key}.latents.safetensors`" if dataset.with_latents else ""} |
| `{INDEX}/{{name}}.parquet` | one row per sample of `{SHARDS}/{{name}}.tar`: key, shard, members, caption, status, filter reasons, quality signals, every metadata field |
| `{DROPPED}/*.parquet` | samples that failed the filters and were left out (same columns, no shard) |

A shard is part of the dataset once its index part exists (it is written after the tar): list shards
through the index, as below, and an interrupted write is never read. `key` is the video's content
address (the same request and model give the same key). `video_offset` and `video_size` locate the
video's bytes inside its shard, for range reads of single samples.

Nested metadata is flattened in the index: `seconds_{{stage}}`, `resolved_{{setting}}`, `request_{{field}}`
(`request_guidance_{{weight}}`); `scenes` lists each scene's prompt, frames and times; `request_camera` is
JSON. The columns:

{columns}.

## Quality signals

Computed from the decoded frames, without learned weights.

| signal | unit | definition |
|---|---|---|
{signals}

## Load the index with `datasets`

```python
from datasets import load_dataset

root = {json.dumps(uri)}  # where this card lies
storage_options = {json.dumps(options)}  # credentials: the usual AWS variables or profile

index = load_dataset("parquet", data_files=f"{{root}}/{INDEX}/*.parquet", storage_options=storage_options,
                     split="train")
moving = index.filter(lambda row: row["status"] == "ok" and row["motion"] >= 0.5)
print(index.num_rows, "samples,", moving.num_rows, "moving")
```

## Stream the shards with `webdataset`

```python
import io
import json

import av
import fsspec
import numpy as np
import pyarrow.dataset as pads
import webdataset as wds
from webdataset.gopen import gopen_schemes

root = {json.dumps(uri)}  # where this card lies
storage_options = {json.dumps(options)}

fs, path = fsspec.core.url_to_fs(root, **storage_options)
shard_column = pads.dataset(f"{{path}}/{INDEX}", format="parquet", filesystem=fs).to_table(columns=["shard"])
shards = sorted({{f"{{root}}/{{name}}" for name in shard_column["shard"].to_pylist() if name}})
{_opener(uri)}

def decode(sample):
    with av.open(io.BytesIO(sample["{video_format}"])) as container:
        frames = np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])
    return {{"frames": frames, "caption": sample["txt"].decode(), "meta": json.loads(sample["json"])}}


first = next(iter(wds.WebDataset(shards, shardshuffle=False).map(decode)))
print(first["caption"], first["frames"].shape)  # (frames, height, width, 3) uint8
```

A training loop: shuffled shards and samples, split over nodes and loader workers, batches of clips.

```python
train = (wds.WebDataset(shards, shardshuffle=len(shards), nodesplitter=wds.split_by_node)
         .shuffle(256).map(decode).to_tuple("frames", "caption").batched(4))
loader = wds.WebLoader(train, batch_size=None, num_workers=2)
frames, captions = next(iter(loader))  # frames: (4, frames, height, width, 3) uint8; captions: 4 strings
```
"""


def _opener(uri: str) -> str:
    """Local shards open as files; for a store, webdataset is told to open its URLs with fsspec."""
    scheme = uri.partition("://")[0] if "://" in uri else ""
    if scheme in ("", "file"):
        return ""
    return f"""

def open_url(url, mode="rb", bufsize=8192, **kw):  # webdataset opens {scheme}:// URLs with fsspec
    return fsspec.open(url, mode, **storage_options).open()


gopen_schemes[{json.dumps(scheme)}] = open_url
"""


def write_dataset_card(fs: AbstractFileSystem, root: str, **card) -> str:
    """Write README.md at `root` (the arguments of `dataset_card` but `uri`) unless it already says the
    same (a re-run of a finished job writes nothing); returns its URI."""
    path = f"{root}/{CARD}"
    # Local outputs are shown as plain paths: the code in the card then needs no file:// handling.
    uri = root if isinstance(fs, LocalFileSystem) else uri_of(fs, root)
    text = dataset_card(uri=uri, **card).encode()
    if not (fs.exists(path) and fs.cat_file(path) == text):
        write_atomic(fs, path, text)
    return uri_of(fs, path)
