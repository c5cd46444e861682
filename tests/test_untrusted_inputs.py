"""Untrusted manifests: which image sources a row may use, how much of one is read, and prompts with control characters."""

from __future__ import annotations

import functools
import http.server
import io
import os
import threading
import uuid

import psutil
import pytest
import s3fs
import urllib3
from PIL import Image

from kvray.config.images import ImagePolicy
from kvray.config.job import RenderJob, RequestDefaults
from kvray.io.images import ImageError, load_image, refused_address
from kvray.requests.manifest import plan_row


def _png(size=(24, 16)) -> bytes:
    out = io.BytesIO()
    Image.new("RGBA", size, (200, 30, 30, 128)).save(out, "PNG")
    return out.getvalue()


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Files of a directory, plus `/to/<url>`: a redirect to <url>."""

    def log_message(self, *args):
        pass

    def do_GET(self):
        if self.path.startswith("/to/"):
            self.send_response(302)
            self.send_header("Location", self.path[len("/to/"):])
            self.end_headers()
            return
        super().do_GET()


@pytest.fixture
def web(tmp_path):
    """An http server on loopback serving `tmp_path/www`: yields its port."""
    root = tmp_path / "www"
    root.mkdir()
    (root / "a.png").write_bytes(_png())
    (root / "big.png").write_bytes(_png() + b"\0" * 200_000)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def test_loopback_http_refused_by_default_allowed_with_the_opt_in(web):
    url = f"http://127.0.0.1:{web}/a.png"
    default = ImagePolicy(prefixes=[])
    for source in (url, f"http://localhost:{web}/a.png", f"http://2130706433:{web}/a.png"):  # 2130706433: 127.0.0.1
        with pytest.raises(ImageError, match="loopback, private or reserved.*allow_private_network"):
            load_image(source, policy=default)
    private = ImagePolicy(prefixes=[], allow_private_network=True)
    assert load_image(url, policy=private).size == (24, 16)
    assert load_image(f"http://localhost:{web}/a.png", policy=private).mode == "RGBA"
    # Redirects are followed one at a time, each checked as a new source.
    assert load_image(f"http://127.0.0.1:{web}/to/{url}", policy=private).size == (24, 16)
    with pytest.raises(ImageError, match="169.254.169.254 is a link-local or cloud metadata"):
        load_image(f"http://127.0.0.1:{web}/to/http://169.254.169.254/latest/meta-data/", policy=private)
    with pytest.raises(ImageError, match="redirects"):
        load_image(f"http://127.0.0.1:{web}/to/{url}", policy=private.model_copy(update={"max_redirects": 0}))
    with pytest.raises(ImageError, match="non-http"):
        load_image(f"http://127.0.0.1:{web}/to/file:///etc/hostname", policy=private)
    with pytest.raises(ImageError, match="HTTP 404"):
        load_image(f"http://127.0.0.1:{web}/missing.png", policy=private)
    with pytest.raises(ImageError, match="larger than images.max_bytes"):
        load_image(f"http://127.0.0.1:{web}/big.png", policy=private.model_copy(update={"max_bytes": 100_000}))


def test_metadata_addresses_refused_without_connecting(monkeypatch):
    def no_connection(*args, **kwargs):
        raise AssertionError("a refused address was connected to")

    monkeypatch.setattr(urllib3.util.connection, "create_connection", no_connection)
    private = ImagePolicy(prefixes=[], allow_private_network=True)  # private opted in, metadata still refused
    for url in ("http://169.254.169.254/latest/meta-data/iam/security-credentials/",
                "http://169.254.170.2/v2/credentials", "http://[fd00:ec2::254]/latest/meta-data/",
                "http://[::ffff:169.254.169.254]/latest/", "https://100.100.100.200/latest/meta-data/"):
        with pytest.raises(ImageError, match="link-local or cloud metadata.*allow_link_local"):
            load_image(url, policy=private)
    default = ImagePolicy()
    for address in ("127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "100.64.0.1", "0.0.0.0", "::1",
                    "fc00::1", "::ffff:10.0.0.1"):
        assert "allow_private_network" in refused_address(address, default), address
        assert refused_address(address, private) is None, address
    for address in ("169.254.1.1", "fe80::1%eth0", "192.0.0.192"):
        assert "allow_link_local" in refused_address(address, private), address
        assert refused_address(address, ImagePolicy(allow_link_local=True)) is None
    assert "multicast" in refused_address("224.0.0.1", ImagePolicy(allow_private_network=True))
    for address in ("8.8.8.8", "2606:4700:4700::1111", "93.184.216.34"):
        assert refused_address(address, default) is None


def test_local_files_only_under_the_allowed_directories(tmp_path):
    inside, outside = tmp_path / "manifest", tmp_path / "elsewhere"
    inside.mkdir()
    outside.mkdir()
    (inside / "a.png").write_bytes(_png())
    (outside / "b.png").write_bytes(_png())
    (inside / "link.png").symlink_to(outside / "b.png")
    policy = ImagePolicy(prefixes=[str(inside)])
    assert load_image(str(inside / "a.png"), policy=policy).size == (24, 16)
    assert load_image(f"file://{inside / 'a.png'}", policy=policy).size == (24, 16)
    for source in (str(outside / "b.png"), f"file://{outside / 'b.png'}", str(inside / ".." / "elsewhere" / "b.png"),
                   str(inside / "link.png"), "/etc/shadow", "/etc/hostname", "file:///etc/passwd"):
        with pytest.raises(ImageError, match="outside the allowed directories"):
            load_image(source, policy=policy)
    # No local file at all when the manifest is remote; any local file with "file" opted in, but files only.
    with pytest.raises(ImageError, match=r"outside the allowed directories \(none\)"):
        load_image(str(inside / "a.png"), policy=ImagePolicy(prefixes=["s3://bucket/images/"]))
    anywhere = ImagePolicy(prefixes=[], schemes=["file"])
    assert load_image(f"file://{outside / 'b.png'}", policy=anywhere).size == (24, 16)
    with pytest.raises(ImageError, match="not a file"):
        load_image("/dev/zero", policy=anywhere)
    with pytest.raises(ImageError, match="not a file"):
        load_image(str(inside), policy=policy)


def test_a_file_over_max_bytes_is_refused_without_reading_it_whole(tmp_path):
    huge = tmp_path / "huge.png"
    with open(huge, "wb") as f:
        f.write(_png())
        f.truncate(16 * 2**30)  # 16 GiB, sparse: reading it whole would take minutes and all memory
    policy = ImagePolicy(prefixes=[str(tmp_path)], max_bytes=2**20)
    counters = psutil.Process().io_counters()
    with pytest.raises(ImageError, match=r"larger than images.max_bytes \(1048576 bytes\)"):
        load_image(str(huge), policy=policy)
    read = psutil.Process().io_counters().read_chars - counters.read_chars
    assert read < 4 * 2**20, read  # max_bytes + 1, and little else


def test_buckets_and_prefixes(s3_bucket):
    fs = s3fs.S3FileSystem(**s3_bucket.storage_options)
    other = f"kvray-other-{uuid.uuid4().hex[:12]}"
    fs.mkdir(other)
    try:
        for path in (f"{s3_bucket.name}/prompts/img/a.png", f"{s3_bucket.name}/private/a.png", f"{other}/a.png"):
            fs.pipe_file(path, _png())
        fs.pipe_file(f"{s3_bucket.name}/prompts/img/big.png", _png() + b"\0" * 100_000)
        job = RenderJob(manifest=f"{s3_bucket.uri}/prompts/m.parquet", out=f"{s3_bucket.uri}/out")
        policy = job.images
        assert policy.prefixes == (f"{s3_bucket.uri}/prompts/",)
        options = s3_bucket.storage_options
        assert load_image(f"{s3_bucket.uri}/prompts/img/a.png", options, policy).size == (24, 16)
        for source in (f"s3://{other}/a.png", f"{s3_bucket.uri}/private/a.png", f"{s3_bucket.uri}/prompts-x/a.png",
                       f"{s3_bucket.uri}/prompts/../private/a.png", f"{s3_bucket.uri}/prompts/%2E%2E/private/a.png",
                       f"simplecache::{s3_bucket.uri}/prompts/img/a.png", "memory://prompts/a.png"):
            with pytest.raises(ImageError, match="outside the allowed prefixes|segments|chained"):
                load_image(source, options, policy)
        # Other buckets with the job's credentials only when the job says so.
        assert load_image(f"s3://{other}/a.png", options, ImagePolicy(prefixes=[], schemes=["s3"])).size == (24, 16)
        with pytest.raises(ImageError, match="max_bytes"):
            load_image(f"{s3_bucket.uri}/prompts/img/big.png", options, policy.model_copy(update={"max_bytes": 50_000}))
        with pytest.raises(ImageError, match="cannot read image"):
            load_image(f"{s3_bucket.uri}/prompts/img/missing.png", options, policy)
    finally:
        fs.rm(other, recursive=True)


def test_the_default_prefix_is_the_manifests_location_resolved_where_images_are_read(tmp_path, monkeypatch):
    from kvray.io.images import check_source

    monkeypatch.chdir(tmp_path)
    # A relative manifest gives a relative prefix, kept so through the job's JSON: it is resolved where the
    # images are read, against the same working directory as the rows' relative image paths (a Ray job's
    # working_dir on each node, whose absolute path differs from node to node).
    job = RenderJob(manifest="prompts/part-*.parquet", out="out")
    assert job.images.prefixes == ("prompts/",)
    again = RenderJob.model_validate_json(job.model_dump_json())
    assert again.images == job.images
    assert check_source("prompts/images/a.png", job.images) == f"{tmp_path}/prompts/images/a.png"
    with pytest.raises(ImageError, match="outside the allowed directories"):
        check_source("other/a.png", job.images)
    assert RenderJob(manifest=f"{tmp_path}/prompts/m.parquet", out="out").images.prefixes == (f"{tmp_path}/prompts/",)
    named = RenderJob(manifest="m.parquet", out="o", images={"prefixes": ["s3://b/img"], "allow_private_network": True})
    assert named.images.prefixes == ("s3://b/img/",) and named.images.allow_private_network
    secret = RenderJob(manifest="https://user:pw@example.com/d/m.parquet?token=abc", out="o")
    assert secret.images.prefixes == ("https://example.com/d/",)  # no credentials copied into the policy
    with pytest.raises(ValueError, match="not URI schemes"):
        RenderJob(manifest="m.parquet", out="o", images={"schemes": ["s3://"]})
    with pytest.raises(ValueError, match="extra"):
        RenderJob(manifest="m.parquet", out="o", images={"allow_everything": True})


@pytest.mark.parametrize("prompt, bad", [("a cat\x1b[2J", "U+001B"), ("a\x00cat", "U+0000"), ("a\x85cat", "U+0085"),
                                         ("a\x7fcat", "U+007F"), ("a\udcffcat", "U+DCFF")])
def test_prompts_with_control_characters_are_row_errors(prompt, bad):
    planned = plan_row({"prompt": prompt}, RequestDefaults(), "model", (64, 64))
    assert planned.request is None and bad in planned.error and "control character" in planned.error
    scenes = plan_row({"scenes": ["a dog", prompt]}, RequestDefaults(), "model", (64, 64))
    assert scenes.request is None and "scene 2 prompt" in scenes.error
    fine = plan_row({"prompt": "a cat\tsits\non a mat\r\n"}, RequestDefaults(), "model", (64, 64))
    assert not fine.error and fine.request.prompt.startswith("a cat")


def test_default_policy_allows_public_web_and_the_manifest_location_only(tmp_path):
    policy = RenderJob(manifest=str(tmp_path / "m.parquet"), out="o").images
    assert policy.schemes == ("http", "https") and not policy.allow_private_network and not policy.allow_link_local
    assert policy.prefixes == (f"{tmp_path}/",)
    assert policy.max_bytes == 64 * 2**20 and policy.max_pixels == 50_000_000
    assert os.path.isabs(policy.local_roots[0]) and policy.uri_prefixes == ()
