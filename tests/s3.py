"""A real S3 endpoint for tests: moto's server on loopback, one per test session.

Use from any test module once `tests/conftest.py` imports these fixtures
(`from .s3 import s3_endpoint, s3_bucket  # noqa: F401`):

    def test_upload(s3_bucket):
        fs = s3fs.S3FileSystem(**s3_bucket.storage_options)
        fs.pipe_file(f"{s3_bucket.name}/a.txt", b"hi")

Nothing is mocked inside the client: s3fs / botocore talk HTTP to the moto server.
"""

from __future__ import annotations

import dataclasses
import os
import uuid
from typing import Any

import pytest

ACCESS_KEY = "kvray-test-access-key"
SECRET_KEY = "kvray-test-secret-key"
REGION = "us-east-1"

_ENV = {
    "AWS_ACCESS_KEY_ID": ACCESS_KEY,
    "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
    "AWS_DEFAULT_REGION": REGION,
    "AWS_REGION": REGION,
    # Never probe the instance-metadata address for credentials or region.
    "AWS_EC2_METADATA_DISABLED": "true",
    # Keep a developer's own ~/.aws profile (region, endpoint, credentials) out of the tests.
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
}
_UNSET = ("AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")


@dataclasses.dataclass(frozen=True)
class S3Bucket:
    """A fresh, empty bucket on the session's moto server."""

    name: str
    endpoint_url: str

    @property
    def uri(self) -> str:
        return f"s3://{self.name}"

    @property
    def storage_options(self) -> dict[str, Any]:
        """Options for `s3fs.S3FileSystem(**options)` / `fsspec.filesystem("s3", **options)`; a fresh dict each time."""
        return {"key": ACCESS_KEY, "secret": SECRET_KEY, "client_kwargs": {"endpoint_url": self.endpoint_url}}


def _boto_client(endpoint_url: str):
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=endpoint_url,
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        region_name=REGION,
    )


@pytest.fixture(scope="session")
def s3_endpoint():
    """URL of a moto S3 server on 127.0.0.1 (an OS-chosen free port), with test credentials in the environment."""
    server_module = pytest.importorskip("moto.server", reason="moto[server] is needed for the S3 tests")
    with pytest.MonkeyPatch.context() as mp:
        for name, value in _ENV.items():
            mp.setenv(name, value)
        for name in _UNSET:
            mp.delenv(name, raising=False)
        # port=0: the OS picks a free port when the server binds, so no race with other processes.
        server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        try:
            yield f"http://{host}:{port}"
        finally:
            server.stop()


@pytest.fixture(scope="session")
def s3_serial_endpoint(s3_endpoint):
    """URL of a second moto server that answers one request at a time, sharing the first one's buckets.

    moto 5.2.5 checks a conditional write (If-None-Match: *, If-Match) and then writes, without a lock,
    so two simultaneous requests to the threaded server can both pass (seen once in 60 rounds of 8
    processes racing), which S3 itself never allows. Tests of races between conditional writes use this one.
    """
    import threading

    from moto.server import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import make_server

    server = make_server("127.0.0.1", 0, DomainDispatcherApplication(create_backend_app), threaded=False)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        thread.join()


@pytest.fixture
def s3_bucket(s3_endpoint) -> S3Bucket:
    """A new bucket for one test (removed with its objects afterwards)."""
    bucket = S3Bucket(name=f"kvray-test-{uuid.uuid4().hex[:16]}", endpoint_url=s3_endpoint)
    client = _boto_client(s3_endpoint)
    client.create_bucket(Bucket=bucket.name)  # us-east-1: no LocationConstraint
    yield bucket
    try:
        paginator = client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=bucket.name):
            keys = [{"Key": obj["Key"]} for obj in page.get("Contents", [])]
            if keys:
                client.delete_objects(Bucket=bucket.name, Delete={"Objects": keys})
        client.delete_bucket(Bucket=bucket.name)
    except Exception:  # cleanup only: a test that removed its own bucket is fine
        pass
