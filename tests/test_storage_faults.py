"""Storage faults mid-run, without Ray: the storage calls the renderer makes (open_fs, write_atomic of a
few KB and of several MB, read_bytes, exists, listing a prefix, Parquet reads through pyarrow) against
moto's S3 behind a fault-injecting proxy, one fault kind at a time, each with its own expectation."""

from __future__ import annotations

import io
import os
import pickle
import time

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import s3fs

from kvray.bench.fault_proxy import FaultyProxy
from kvray.io.atomic import exists, list_files, read_bytes, write_atomic
from kvray.io.failures import StorageError, storage_errors
from kvray.io.manifest import open_manifest
from kvray.io.opening import S3_POLICY, RetryPolicy, open_fs, storage_options_for

SMALL = os.urandom(4 << 10)
LARGE = os.urandom(6 << 20)


def _parquet() -> bytes:
    sink = io.BytesIO()
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(500)], "prompt": ["a fox"] * 500}), sink,
                   row_group_size=100)
    return sink.getvalue()


PARQUET = _parquet()


def _through(bucket, proxy: FaultyProxy, **config) -> tuple[s3fs.S3FileSystem, str]:
    """open_fs of the bucket's `out` prefix through the proxy; `config` overrides botocore's settings."""
    options = {**bucket.storage_options, "client_kwargs": {"endpoint_url": proxy.url}}
    if config:
        options["config_kwargs"] = config
    return open_fs(f"s3://{bucket.name}/out/", options)


def _direct(bucket) -> s3fs.S3FileSystem:
    """The bucket without the proxy, to see what really is there."""
    return s3fs.S3FileSystem(**bucket.storage_options, skip_instance_cache=True)


def _read_parquet(fs, path: str) -> pa.Table:
    with storage_errors(fs, path):
        return pq.read_table(path, filesystem=pafs.PyFileSystem(pafs.FSSpecHandler(fs)))


def _renderer_calls(fs, root: str) -> None:
    """What one render does to its output prefix and its manifest, checked as it goes."""
    write_atomic(fs, f"{root}/meta/a.json", SMALL)
    write_atomic(fs, f"{root}/videos/a.mp4", LARGE)
    write_atomic(fs, f"{root}/in.parquet", PARQUET)
    assert read_bytes(fs, f"{root}/meta/a.json") == SMALL
    assert read_bytes(fs, f"{root}/videos/a.mp4") == LARGE
    assert exists(fs, f"{root}/meta/a.json") and not exists(fs, f"{root}/meta/missing.json")
    assert list_files(fs, root) == [f"{root}/in.parquet", f"{root}/meta/a.json", f"{root}/videos/a.mp4"]
    assert _read_parquet(fs, f"{root}/in.parquet").num_rows == 500


# ---------------------------------------------------------------------------------------------- policy


def test_s3_gets_the_retry_policy_under_the_users_options(monkeypatch):
    for name in ("AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    fs, root = open_fs("s3://bucket/out/", {"anon": True})
    assert root == "bucket/out"
    assert fs.config_kwargs == {"retries": {"mode": "standard", "max_attempts": 5},
                                "connect_timeout": 5.0, "read_timeout": 15.0}
    assert fs.retries == 2 and RetryPolicy.of(fs) == S3_POLICY
    # Each of the user's settings wins, the rest of the policy stays.
    options = storage_options_for("s3a://bucket", {"config_kwargs": {"retries": {"max_attempts": 9}, "read_timeout": 3}})
    assert options["config_kwargs"] == {"retries": {"mode": "standard", "max_attempts": 9},
                                        "connect_timeout": 5.0, "read_timeout": 3}
    assert RetryPolicy.of(open_fs("s3://bucket", {"anon": True, **options})[0]).max_attempts == 9
    # So do the AWS variables, as for any AWS tool.
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "3")
    assert storage_options_for("s3://bucket")["config_kwargs"]["retries"] == {"mode": "standard"}
    # Other schemes are left alone.
    assert storage_options_for("gs://bucket", {"token": "anon"}) == {"token": "anon"}
    assert storage_options_for("/tmp/out") == {}
    # The stated bounds (docs/storage.md).
    assert S3_POLICY.attempts_per_call == 6
    assert 240 < S3_POLICY.stall_bound_s < 310 and S3_POLICY.refused_bound_s <= 61


def test_a_storage_error_is_one_line_naming_uri_and_endpoint():
    fs, root = open_fs("s3://bucket/out", {"anon": True, "client_kwargs": {"endpoint_url": "http://u:pw@127.0.0.1:9"}})
    from botocore.exceptions import ReadTimeoutError

    with pytest.raises(StorageError) as caught, storage_errors(fs, f"{root}/run.json"):
        raise ReadTimeoutError(endpoint_url="http://127.0.0.1:9/bucket/out/run.json")
    message = str(caught.value)
    assert message.startswith("s3://bucket/out/run.json at http://u:***@127.0.0.1:9: no answer within the read timeout (15 s)")
    assert "\n" not in message and "pw" not in message and "retries spent (up to 12 attempts)" in message
    assert isinstance(caught.value, OSError)  # the CLI's `except OSError` -> "error: storage failed: ..."
    assert str(pickle.loads(pickle.dumps(caught.value))) == message  # crosses process boundaries whole
    for answer in (FileNotFoundError("gone"), FileExistsError("there"), ValueError("bad")):
        with pytest.raises(type(answer)), storage_errors(fs, root):
            raise answer


# ---------------------------------------------------------------------------------------- fault kinds


@pytest.mark.parametrize("fault, after_upstream", [("slowdown", False), ("internal", False), ("reset", False),
                                                   ("reset", True)],
                         ids=["503-slowdown", "500-internal", "reset-before", "reset-after-upstream"])
def test_transient_faults_are_retried_and_every_call_succeeds(s3_bucket, fault, after_upstream):
    with FaultyProxy(s3_bucket.endpoint_url, fault_rate=0.25, seed=3, fault=fault, after_upstream=after_upstream) as proxy:
        fs, root = _through(s3_bucket, proxy)
        _renderer_calls(fs, root)
    assert proxy.faults >= 3, f"only {proxy.faults} of {proxy.requests} requests faulted"


def test_truncated_answers_are_retried_or_an_error_never_short_data(s3_bucket):
    direct = _direct(s3_bucket)
    direct.pipe_file(f"{s3_bucket.name}/out/big.bin", LARGE)
    direct.pipe_file(f"{s3_bucket.name}/out/in.parquet", PARQUET)
    outcomes = []
    with FaultyProxy(s3_bucket.endpoint_url, fault_rate=0.3, seed=5, fault="truncate", methods=("GET",)) as proxy:
        fs, root = _through(s3_bucket, proxy)
        for _ in range(8):
            try:
                assert read_bytes(fs, f"{root}/big.bin") == LARGE
                assert _read_parquet(fs, f"{root}/in.parquet").num_rows == 500
                outcomes.append("ok")
            except StorageError as err:
                assert "answer cut short" in str(err), err
                outcomes.append("error")
    assert proxy.faults >= 5
    assert outcomes.count("ok") >= 4, outcomes  # one truncation is retried; only repeated ones fail


def test_a_stalled_endpoint_is_a_clear_error_within_the_stated_time(s3_bucket):
    config = {"retries": {"max_attempts": 1}, "read_timeout": 0.5, "connect_timeout": 0.5}
    with FaultyProxy(s3_bucket.endpoint_url, fault_rate=1.0, fault="stall") as proxy:
        fs, root = _through(s3_bucket, proxy, **config)
        bound = RetryPolicy.of(fs).stall_bound_s
        for call in (lambda: write_atomic(fs, f"{root}/meta/a.json", SMALL), lambda: read_bytes(fs, f"{root}/x")):
            start = time.monotonic()
            with pytest.raises(StorageError, match=r"no answer within the read timeout \(0.5 s\)"):
                call()
            elapsed = time.monotonic() - start
            assert 1 <= elapsed <= bound, (elapsed, bound)  # every attempt waited, and no longer than stated
    assert proxy.requests == 8  # 2 attempts x 2 passes, per call
    assert not _direct(s3_bucket).exists(f"{s3_bucket.name}/out/meta/a.json")


def test_a_slow_answer_within_the_read_timeout_is_fine(s3_bucket):
    config = {"read_timeout": 2}
    with FaultyProxy(s3_bucket.endpoint_url, fault_rate=0.5, seed=1, fault="stall", stall_s=0.5) as proxy:
        fs, root = _through(s3_bucket, proxy, **config)
        write_atomic(fs, f"{root}/meta/a.json", SMALL)
        assert read_bytes(fs, f"{root}/meta/a.json") == SMALL
    assert proxy.faults >= 1


def test_an_endpoint_gone_half_way_is_a_clear_error_and_leaves_no_partial_object(s3_bucket):
    with FaultyProxy(s3_bucket.endpoint_url, fault="gone", gone_after=1) as proxy:
        fs, root = _through(s3_bucket, proxy, retries={"max_attempts": 1})
        write_atomic(fs, f"{root}/meta/a.json", SMALL)  # request 1: the endpoint is still there
        start = time.monotonic()
        with pytest.raises(StorageError, match=r"(cannot connect|connection closed).*attempts"):
            write_atomic(fs, f"{root}/videos/a.mp4", LARGE)
        assert time.monotonic() - start <= RetryPolicy.of(fs).stall_bound_s
        with pytest.raises(StorageError, match="cannot connect"):
            list_files(fs, root)
        with pytest.raises(StorageError, match=r"s3://.*/out/in\.parquet at http://127\.0\.0\.1:\d+: cannot connect"):
            open_manifest(f"s3://{s3_bucket.name}/out/in.parquet", {**s3_bucket.storage_options,
                           "client_kwargs": {"endpoint_url": proxy.url}, "config_kwargs": {"retries": {"max_attempts": 1}}})
    direct = _direct(s3_bucket)
    assert direct.cat_file(f"{s3_bucket.name}/out/meta/a.json") == SMALL
    assert direct.find(f"{s3_bucket.name}/out") == [f"{s3_bucket.name}/out/meta/a.json"]  # nothing partial
