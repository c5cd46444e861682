"""Weights fetched once per node, safely: concurrent fetches, digests, corrupted copies, the hub cache."""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
from pathlib import Path

import fsspec
import pytest

from kvray.weights.source import WeightsCorrupt, WeightsSource, hub_cache_dir

from .s3 import _ENV, _boto_client

WEIGHTS = os.urandom(3 << 20)
SHA256 = hashlib.sha256(WEIGHTS).hexdigest()


def _memory_source(tmp_path, name: str, data: bytes = WEIGHTS, sidecar: str | None = None) -> WeightsSource:
    fs = fsspec.filesystem("memory")
    root = f"/w-{name}"
    fs.pipe_file(f"{root}/t2v.pt", data)
    if sidecar is not None:
        fs.pipe_file(f"{root}/t2v.pt.sha256", f"{sidecar}  t2v.pt\n".encode())
    return WeightsSource(f"memory://{root}", cache_dir=tmp_path / "cache")


def _fetches(caplog) -> int:
    return sum(r.getMessage().startswith("fetching ") for r in caplog.records)


def _stamp(path) -> dict:
    return json.loads(path.with_name(f".{path.name}.verified.json").read_text())


def _fetch_in_process(uri, options, cache, env, barrier, results):
    os.environ.update(env)
    fetched = []
    logger = logging.getLogger("kvray.weights.source")
    logger.setLevel(logging.INFO)
    logger.addFilter(lambda r: fetched.append(r) or True)
    barrier.wait(timeout=60)
    path = WeightsSource(uri, cache_dir=cache, storage_options=options).path("t2v.pt")
    results.put((str(path), hashlib.sha256(path.read_bytes()).hexdigest(),
                 sum(r.getMessage().startswith("fetching ") for r in fetched)))


def test_processes_fetching_one_file_at_once_download_it_once(s3_bucket, tmp_path):
    _boto_client(s3_bucket.endpoint_url).put_object(Bucket=s3_bucket.name, Key="w/kv/t2v.pt", Body=WEIGHTS)
    processes = 4
    # Forked: the children need not import torch again (kvray.weights does); fsspec starts afresh in a child.
    context = multiprocessing.get_context("fork")
    barrier, results = context.Barrier(processes), context.Queue()
    workers = [context.Process(target=_fetch_in_process, args=(f"{s3_bucket.uri}/w/kv", s3_bucket.storage_options,
                                                                str(tmp_path / "cache"), _ENV, barrier, results))
               for _ in range(processes)]
    for worker in workers:
        worker.start()
    outcomes = [results.get(timeout=120) for _ in range(processes)]
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0
    assert len({path for path, _, _ in outcomes}) == 1
    assert all(digest == SHA256 for _, digest, _ in outcomes)  # every process: the whole, verified file
    assert sum(fetches for _, _, fetches in outcomes) == 1  # one download
    path = Path(outcomes[0][0])
    assert sorted(p.name for p in path.parent.iterdir() if p.suffix != ".lock") == [".t2v.pt.verified.json", "t2v.pt"]
    assert _stamp(path)["checked"] == "S3 ETag (MD5)"


def test_the_strongest_digest_s3_gives_is_checked(s3_bucket, tmp_path):
    client = _boto_client(s3_bucket.endpoint_url)
    client.put_object(Bucket=s3_bucket.name, Key="w/t2v.pt", Body=WEIGHTS, ChecksumAlgorithm="SHA256")
    # Under SSE-KMS the ETag is not the MD5: the CRC32 botocore uploads by default is checked instead.
    client.put_object(Bucket=s3_bucket.name, Key="w/movq.pt", Body=WEIGHTS, ServerSideEncryption="aws:kms",
                      ChecksumAlgorithm="CRC32")
    source = WeightsSource(f"{s3_bucket.uri}/w", cache_dir=tmp_path, storage_options=s3_bucket.storage_options)
    for name, checked in (("t2v.pt", "S3 ChecksumSHA256"), ("movq.pt", "S3 ChecksumCRC32")):
        path = source.path(name)
        assert path.read_bytes() == WEIGHTS and _stamp(path)["checked"] == checked


def test_a_corrupted_cached_copy_is_detected_and_fetched_again(tmp_path, caplog):
    caplog.set_level(logging.INFO, "kvray.weights.source")
    source = _memory_source(tmp_path, "corrupt", sidecar=SHA256)
    path = source.path("t2v.pt")
    assert path.read_bytes() == WEIGHTS and _stamp(path)["checked"].startswith("sidecar memory://")
    assert source.path("t2v.pt") == path and _fetches(caplog) == 1  # reused as it is
    with open(path, "r+b") as fh:  # bit rot, same size
        fh.seek(1 << 20)
        fh.write(b"\x00" * 16)
    assert source.path("t2v.pt").read_bytes() == WEIGHTS
    assert _fetches(caplog) == 2 and "differs from the copy verified" in caplog.text
    path.write_bytes(WEIGHTS[:100])  # cut short
    assert source.path("t2v.pt").read_bytes() == WEIGHTS and _fetches(caplog) == 3
    # The source changing is noticed too (its identity is part of the stamp).
    fsspec.filesystem("memory").rm("/w-corrupt/t2v.pt.sha256")
    fsspec.filesystem("memory").pipe_file("/w-corrupt/t2v.pt", WEIGHTS[::-1])
    assert source.path("t2v.pt").read_bytes() == WEIGHTS[::-1] and _fetches(caplog) == 4


def test_a_download_that_does_not_match_its_digest_is_refused_and_not_kept(tmp_path):
    source = _memory_source(tmp_path, "bad", sidecar="0" * 64)
    with pytest.raises(WeightsCorrupt, match="does not match its sidecar"):
        source.path("t2v.pt")
    cached = [p.name for p in (tmp_path / "cache").rglob("*") if p.is_file() and not p.name.endswith(".lock")]
    assert cached == []  # no partial, no unverified copy


def test_hub_sources_use_huggingface_hubs_own_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    assert WeightsSource("owner/name").hub_cache_dir is None  # huggingface_hub decides: HF_HUB_CACHE, HF_HOME
    assert hub_cache_dir(tmp_path) == str(tmp_path / "hub")
    # A cache laid out as huggingface_hub does: the LFS blob is named by its sha256.
    repo = tmp_path / "hub" / "models--owner--tiny-kv"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    blob = repo / "blobs" / SHA256
    blob.write_bytes(WEIGHTS)
    (snapshot / "t2v.pt").symlink_to(blob)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    source = WeightsSource("owner/tiny-kv", cache_dir=tmp_path)
    assert source.path("t2v.pt").read_bytes() == WEIGHTS
    assert json.loads((tmp_path / "verified" / f"{SHA256}.json").read_text())["sha256"] == SHA256
    blob.write_bytes(WEIGHTS[:-1] + b"!")  # corrupted in the cache; offline, it cannot be fetched again
    with pytest.raises(WeightsCorrupt, match="does not match its sha256"):
        source.path("t2v.pt")
