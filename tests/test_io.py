"""kvray.io: video encoding round trips, atomic writes (local, generic, real S3 through moto), names, options."""

from __future__ import annotations

import json
import os
import struct
from fractions import Fraction

import fsspec
import numpy as np
import pytest
from fsspec.implementations.dirfs import DirFileSystem

from kvray.io import atomic
from kvray.io.atomic import exists, read_bytes, read_json, write_atomic, write_json
from kvray.io.names import check_name, safe_join
from kvray.io.opening import open_fs, uri_of
from kvray.io.redaction import redact_storage_options
from kvray.io.storage_options import parse_storage_options
from kvray.io.video import clip_fps, encode_video, read_video, video_format


def smooth_frames(f: int = 12, h: int = 64, w: int = 96) -> np.ndarray:
    """A smooth moving colour pattern (low frequencies compress well, so errors stay small)."""
    t = np.arange(f)[:, None, None]
    y = np.arange(h)[None, :, None]
    x = np.arange(w)[None, None, :]
    r = 128 + 100 * np.sin(2 * np.pi * (x / w + t / f))
    g = 128 + 100 * np.cos(2 * np.pi * (y / h - t / (2 * f)))
    b = 128 + 60 * np.sin(2 * np.pi * (x + y) / (h + w)) + 0 * t
    return np.stack(np.broadcast_arrays(r, g, b), axis=-1).round().astype(np.uint8)


def no_temp_files(directory) -> bool:
    return not [name for name in os.listdir(directory) if name.endswith(".tmp")]


# ----------------------------------------------------------------------------- video


def test_clip_fps():
    assert clip_fps(12) == Fraction(24, 11)
    assert clip_fps(45) == Fraction(90, 11)
    assert clip_fps(177) == Fraction(354, 11)
    assert clip_fps(16, seconds=2) == 8
    with pytest.raises(ValueError):
        clip_fps(0)
    with pytest.raises(ValueError):
        clip_fps(12, seconds=0)


@pytest.mark.parametrize("fps", [clip_fps(12), 12 / 5.5, 8, 30000 / 1001])
def test_mp4_round_trip(fps):
    frames = smooth_frames()
    data = encode_video(frames, fps)
    assert data[4:8] == b"ftyp"
    decoded, read_fps = read_video(data)
    assert decoded.shape == frames.shape and decoded.dtype == np.uint8
    assert float(read_fps) == pytest.approx(float(fps), rel=1e-6)
    error = np.abs(decoded.astype(np.int16) - frames.astype(np.int16)).mean()
    assert error < 4, f"mean abs error {error:.2f}"


def top_level_boxes(data: bytes) -> list[str]:
    """The types of an ISO media file's top-level boxes, in file order (size, type; size 1: 64-bit size follows)."""
    boxes, offset = [], 0
    while offset + 8 <= len(data):
        size, kind = struct.unpack(">I4s", data[offset:offset + 8])
        if size == 1:
            size = struct.unpack(">Q", data[offset + 8:offset + 16])[0]
        elif size == 0:  # the box runs to the end of the file
            size = len(data) - offset
        assert size >= 8, f"box {kind!r} at {offset} has size {size}"
        boxes.append(kind.decode("ascii"))
        offset += size
    assert offset == len(data), "the boxes do not tile the file"
    return boxes


def test_mp4_is_faststart():
    """The index (moov) comes before the frames (mdat): a browser plays before it has the whole file."""
    data = encode_video(smooth_frames(f=6), clip_fps(6))
    boxes = top_level_boxes(data)
    assert boxes[0] == "ftyp" and boxes.count("moov") == boxes.count("mdat") == 1
    assert boxes.index("moov") < boxes.index("mdat"), boxes
    assert read_video(data)[0].shape == (6, 64, 96, 3)


def test_mp4_fractional_rate_is_exact():
    _, fps = read_video(encode_video(smooth_frames(f=12), clip_fps(12)))
    assert fps == Fraction(24, 11)


def test_mp4_from_path(tmp_path):
    frames = smooth_frames(f=4)
    path = tmp_path / "clip.mp4"
    path.write_bytes(encode_video(frames, 8, path=path))
    decoded, fps = read_video(str(path))
    assert decoded.shape == frames.shape and fps == 8


def test_mp4_bytes_depend_only_on_the_frames():
    """Noisy clips encoded many times in one process, with memory churned between encodes, each give one
    file (x264's MB-tree made up to 34 different files from 40 encodes of such a clip)."""
    churn = np.random.default_rng(1)
    for seed in range(3):
        rng = np.random.default_rng(seed)
        coarse = rng.normal(128, 40, size=(12, 8, 8, 3)).cumsum(0) / np.sqrt(np.arange(1, 13))[:, None, None, None]
        frames = (np.kron(coarse, np.ones((1, 8, 8, 1))) + rng.normal(0, 6, size=(12, 64, 64, 3))).clip(0, 255).astype(np.uint8)
        files = set()
        for _ in range(15):
            leftover = [churn.integers(0, 255, size=int(churn.integers(1_000, 400_000)), dtype=np.uint8) for _ in range(20)]
            del leftover
            files.add(encode_video(frames, 8))
        assert len(files) == 1, f"clip {seed}: {len(files)} different files"


def test_mp4_quality_setting_changes_size():
    frames = smooth_frames()
    assert len(encode_video(frames, 8, crf=35)) < len(encode_video(frames, 8, crf=10))


@pytest.mark.parametrize("fmt, magic", [("gif", b"GIF89a"), ("webp", b"RIFF")])
def test_animated_image_round_trip(fmt, magic):
    frames = smooth_frames(f=8, h=48, w=64)
    data = encode_video(frames, clip_fps(8), fmt)
    assert data.startswith(magic)
    decoded, fps = read_video(data)
    assert decoded.shape == frames.shape
    # Delays are whole centiseconds (GIF) / milliseconds (WebP), spread to keep the clip's length.
    assert float(fps) == pytest.approx(float(clip_fps(8)), rel=0.02)
    error = np.abs(decoded.astype(np.int16) - frames.astype(np.int16)).mean()
    assert error < 12, f"mean abs error {error:.2f}"


def test_format_from_extension():
    frames = smooth_frames(f=2, h=16, w=16)
    assert video_format("s3://bucket/out/videos/abc.WEBP") == "webp"
    assert video_format("x.gif") == "gif"
    assert encode_video(frames, 8, path="a/b.gif").startswith(b"GIF")
    assert encode_video(frames, 8, path="a/b.webp")[8:12] == b"WEBP"
    with pytest.raises(ValueError, match="extension"):
        video_format("clip.avi")
    with pytest.raises(ValueError, match="does not match"):
        encode_video(frames, 8, "gif", path="clip.mp4")
    with pytest.raises(ValueError, match="unknown video format"):
        encode_video(frames, 8, "mkv")


@pytest.mark.parametrize("h, w", [(63, 64), (64, 63), (1, 1)])
def test_odd_sizes_rejected_for_mp4(h, w):
    with pytest.raises(ValueError, match="even width and height"):
        encode_video(np.zeros((2, h, w, 3), np.uint8), 8)


@pytest.mark.parametrize(
    "frames",
    [np.zeros((2, 16, 16, 3), np.float32), np.zeros((16, 16, 3), np.uint8), np.zeros((2, 16, 16, 4), np.uint8),
     np.zeros((0, 16, 16, 3), np.uint8)],
    ids=["float", "3d", "rgba", "empty"],
)
def test_bad_frames_rejected(frames):
    with pytest.raises(ValueError):
        encode_video(frames, 8)


@pytest.mark.parametrize("fps", [0, -1, float("nan"), float("inf"), "8"])
def test_bad_fps_rejected(fps):
    with pytest.raises(ValueError, match="fps"):
        encode_video(smooth_frames(f=2, h=16, w=16), fps)


# ----------------------------------------------------------------------------- local storage


def test_open_fs_local(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fs, root = open_fs("out/")
    assert root == str(tmp_path / "out")
    assert uri_of(fs, root).startswith("file://")


def test_write_atomic_local(tmp_path):
    fs, root = open_fs(str(tmp_path))
    path = safe_join(root, "videos", "abc.mp4")
    assert not exists(fs, path)
    write_atomic(fs, path, b"one")
    write_atomic(fs, path, b"two")  # overwrite
    assert exists(fs, path) and read_bytes(fs, path) == b"two"
    assert os.listdir(tmp_path / "videos") == ["abc.mp4"]


@pytest.mark.parametrize("fail_in", ["fsync", "replace"])
@pytest.mark.parametrize("existing", [None, b"old complete file"])
def test_write_atomic_local_failure_leaves_nothing_partial(tmp_path, monkeypatch, fail_in, existing):
    fs, root = open_fs(str(tmp_path))
    path = f"{root}/out.bin"
    if existing is not None:
        (tmp_path / "out.bin").write_bytes(existing)

    def boom(*args, **kwargs):
        raise OSError(28, "No space left on device (simulated)")

    monkeypatch.setattr(atomic.os, fail_in, boom)  # fsync: bytes written, not yet committed
    with pytest.raises(OSError, match="simulated"):
        write_atomic(fs, path, b"new content " * 1000)
    monkeypatch.undo()

    if existing is None:
        assert not (tmp_path / "out.bin").exists()
    else:
        assert (tmp_path / "out.bin").read_bytes() == existing
    assert no_temp_files(tmp_path)


def test_write_atomic_local_permissions_follow_umask(tmp_path):
    fs, root = open_fs(str(tmp_path))
    write_atomic(fs, f"{root}/f", b"x")
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "f").stat().st_mode & 0o777 == 0o666 & ~umask


def test_write_atomic_generic_fs_uses_temp_and_move(tmp_path, monkeypatch):
    fs = DirFileSystem(path=str(tmp_path), fs=fsspec.filesystem("file"))  # protocol "dir": neither local nor a store
    write_atomic(fs, "sub/a.json", b"{}")
    assert fs.cat_file("sub/a.json") == b"{}"
    assert no_temp_files(tmp_path / "sub")

    def broken_mv(*args, **kwargs):
        raise OSError("mv failed (simulated)")

    monkeypatch.setattr(fs, "mv", broken_mv)
    with pytest.raises(OSError, match="simulated"):
        write_atomic(fs, "sub/b.json", b"{}")
    assert not (tmp_path / "sub" / "b.json").exists()
    assert no_temp_files(tmp_path / "sub")


def test_write_atomic_memory_fs():
    fs, root = open_fs("memory://kvray-test-io")
    write_json(fs, f"{root}/meta/x.json", {"fps": Fraction(24, 11), "ok": True})
    assert read_json(fs, f"{root}/meta/x.json") == {"fps": 24 / 11, "ok": True}
    fs.rm(root, recursive=True)


def test_json_is_canonical(tmp_path):
    fs, root = open_fs(str(tmp_path))
    write_json(fs, f"{root}/a.json", {"b": np.float32(0.5), "a": [np.int64(1)], "p": tmp_path})
    text = (tmp_path / "a.json").read_text()
    assert text.endswith("\n") and text.index('"a"') < text.index('"b"')
    assert json.loads(text) == {"a": [1], "b": 0.5, "p": str(tmp_path)}
    with pytest.raises(ValueError):
        write_json(fs, f"{root}/nan.json", {"x": float("nan")})
    assert not (tmp_path / "nan.json").exists()


# ----------------------------------------------------------------------------- names


def test_safe_join_accepts_plain_ids():
    assert safe_join("bucket/out", "videos", "3f2a.mp4") == "bucket/out/videos/3f2a.mp4"
    assert safe_join("/", "a") == "/a"
    assert safe_join("root/", "a b", "x..y") == "root/a b/x..y"
    assert check_name("prompt-01_é") == "prompt-01_é"


@pytest.mark.parametrize(
    "bad",
    ["", "   ", ".", "..", "../etc", "a/b", "a\\b", "/abs", "\\\\server", "s3://bucket/key", "file:x", "C:",
     "gs:bucket", "a\x00b", "a\nb", "x" * 256, None],
)
def test_safe_join_rejects_bad_ids(bad):
    with pytest.raises(ValueError):
        safe_join("bucket/out", "videos", bad)


def test_safe_join_needs_a_name():
    with pytest.raises(ValueError):
        safe_join("bucket/out")


# ----------------------------------------------------------------------------- S3 (moto server, real s3fs)


def test_s3_round_trip(s3_bucket):
    fs, root = open_fs(f"{s3_bucket.uri}/out/", s3_bucket.storage_options)
    assert root == f"{s3_bucket.name}/out"
    assert uri_of(fs, root) == f"s3://{s3_bucket.name}/out"
    frames = smooth_frames(f=4)
    path = safe_join(root, "videos", "v1.mp4")
    assert not exists(fs, path)
    write_atomic(fs, path, encode_video(frames, clip_fps(4), path=path))
    write_json(fs, safe_join(root, "meta", "v1.json"), {"fps": clip_fps(4), "uri": uri_of(fs, path)})
    assert exists(fs, path)

    # A second client (no shared listing cache) sees the same objects and nothing else.
    fresh = fsspec.filesystem("s3", skip_instance_cache=True, **s3_bucket.storage_options)
    assert sorted(fresh.find(root)) == [f"{root}/meta/v1.json", f"{root}/videos/v1.mp4"]
    decoded, fps = read_video(read_bytes(fresh, path))
    assert decoded.shape == frames.shape and fps == clip_fps(4)
    assert read_json(fresh, f"{root}/meta/v1.json")["uri"] == f"s3://{path}"


def test_s3_endpoint_as_top_level_option(s3_bucket):
    options = {"key": s3_bucket.storage_options["key"], "secret": s3_bucket.storage_options["secret"],
               "endpoint_url": s3_bucket.endpoint_url}
    fs, root = open_fs(s3_bucket.uri, options)
    write_atomic(fs, f"{root}/x", b"payload")
    assert read_bytes(fs, f"{root}/x") == b"payload"


def test_s3_options_from_strings(s3_bucket):
    items = [f"key={s3_bucket.storage_options['key']}", f"secret={s3_bucket.storage_options['secret']}",
             f"client_kwargs.endpoint_url={s3_bucket.endpoint_url}", "skip_instance_cache=true"]
    fs, root = open_fs(s3_bucket.uri, parse_storage_options(items))
    write_atomic(fs, f"{root}/y", b"z")
    assert exists(fs, f"{root}/y")


# ----------------------------------------------------------------------------- storage options


def test_parse_storage_options():
    options = parse_storage_options(
        ["key=abc", "client_kwargs.endpoint_url=http://127.0.0.1:9000", "client_kwargs.region_name=eu-west-1",
         "anon=false", "max_concurrency=4", 'token="12345"', "config_kwargs={\"retries\": {\"max_attempts\": 2}}",
         "eq=a=b", "key=override"]
    )
    assert options == {
        "key": "override",
        "client_kwargs": {"endpoint_url": "http://127.0.0.1:9000", "region_name": "eu-west-1"},
        "anon": False,
        "max_concurrency": 4,
        "token": "12345",
        "config_kwargs": {"retries": {"max_attempts": 2}},
        "eq": "a=b",
    }
    base = {"client_kwargs": {"region_name": "us-east-1"}}
    merged = parse_storage_options(["client_kwargs.endpoint_url=http://h"], base=base)
    assert merged == {"client_kwargs": {"region_name": "us-east-1", "endpoint_url": "http://h"}}
    assert base == {"client_kwargs": {"region_name": "us-east-1"}}
    assert parse_storage_options([]) == {}


@pytest.mark.parametrize("bad", [["novalue"], ["=x"], ["a..b=1"], [".a=1"], ["a=1", "a.b=2"]])
def test_parse_storage_options_errors(bad):
    with pytest.raises(ValueError):
        parse_storage_options(bad)


def test_parse_storage_options_refuses_a_bare_string():
    with pytest.raises(ValueError):
        parse_storage_options("key=abc")


def test_redact_storage_options():
    options = {
        "key": "AKIA123",
        "secret": "s3cr3t",
        "token": None,
        "anon": False,
        "client_kwargs": {"endpoint_url": "http://user:pw@minio:9000", "aws_session_token": "t",
                          "region_name": "us-east-1"},
        "config_kwargs": {"retries": {"max_attempts": 2}},
        "headers": [{"Authorization": "Bearer x"}],
        "password": 1234,
        "sse_kms_key_id": "kms",
    }
    redacted = redact_storage_options(options)
    assert redacted == {
        "key": "***",
        "secret": "***",
        "token": None,
        "anon": False,
        "client_kwargs": {"endpoint_url": "http://user:***@minio:9000", "aws_session_token": "***",
                          "region_name": "us-east-1"},
        "config_kwargs": {"retries": {"max_attempts": 2}},
        "headers": [{"Authorization": "***"}],
        "password": "***",
        "sse_kms_key_id": "***",
    }
    assert options["key"] == "AKIA123" and options["client_kwargs"]["aws_session_token"] == "t"
    assert "s3cr3t" not in json.dumps(redacted)


def test_storage_option_values_from_the_environment_and_files(tmp_path, monkeypatch):
    monkeypatch.setenv("KVRAY_TEST_SECRET", "from-env")
    (tmp_path / "secret.txt").write_text("12345\n")
    options = parse_storage_options(["secret=@env:KVRAY_TEST_SECRET",
                                     f"client_kwargs.aws_session_token=@file:{tmp_path}/secret.txt",
                                     'literal="@env:NOT_A_REFERENCE"'])
    assert options == {"secret": "from-env", "client_kwargs": {"aws_session_token": "12345"},  # a string, not JSON
                       "literal": "@env:NOT_A_REFERENCE"}
    monkeypatch.delenv("KVRAY_TEST_SECRET")
    with pytest.raises(ValueError, match="KVRAY_TEST_SECRET is not set"):
        parse_storage_options(["secret=@env:KVRAY_TEST_SECRET"])
    with pytest.raises(ValueError, match="cannot read .*missing"):
        parse_storage_options([f"secret=@file:{tmp_path}/missing"])
    assert redact_storage_options({"secret": "@env:NAME", "key": "k"}) == {"secret": "@env:NAME", "key": "***"}


def test_redacted_urls_argv_and_jobs():
    from kvray.io.redaction import redact_job, redact_url, redacted_argv

    assert redact_url("https://h/m.parquet?X-Amz-Credential=AK&X-Amz-Signature=abc&part=1&sig=s") == (
        "https://h/m.parquet?X-Amz-Credential=***&X-Amz-Signature=***&part=1&sig=***")
    assert redact_url("https://u:pw@h/x") == "https://u:***@h/x" and redact_url("s3://b/k?versionId=1") == "s3://b/k?versionId=1"
    argv = ["kvray", "render", "s3://b/m", "--out", "https://u:pw@h/o", "--storage-option", "secret=S1",
            "--storage-option=client_kwargs.aws_session_token=S2", "--storage-option", "anon=false",
            "--storage-option", "key=@env:AWS_KEY", "--env", "HF_TOKEN=S3", "--env=PLAIN=S4", "--auth-token", "S5"]
    assert redacted_argv(argv) == [
        "kvray", "render", "s3://b/m", "--out", "https://u:***@h/o", "--storage-option", "secret=***",
        "--storage-option=client_kwargs.aws_session_token=***", "--storage-option", "anon=false",
        "--storage-option", "key=@env:AWS_KEY", "--env", "HF_TOKEN=***", "--env=PLAIN=***", "--auth-token", "***"]
    job = {"manifest": "https://u:pw@h/m.parquet", "out": "s3://b/o", "models": {"weights": "https://h/w?sig=x"},
           "storage_options": {"secret": "S", "client_kwargs": {"endpoint_url": "http://u:pw@minio"}},
           "defaults": {"guidance": {"key_frame_guidance_scale": 3.0}},
           "runs": [{"storage_options": {"token": "T"}}]}
    assert redact_job(job) == {
        "manifest": "https://u:***@h/m.parquet", "out": "s3://b/o", "models": {"weights": "https://h/w?sig=***"},
        "storage_options": {"secret": "***", "client_kwargs": {"endpoint_url": "http://u:***@minio"}},
        "defaults": {"guidance": {"key_frame_guidance_scale": 3.0}},  # "key" in a number's name: not a secret
        "runs": [{"storage_options": {"token": "***"}}]}
    assert job["storage_options"]["secret"] == "S"  # the input is left alone
