"""Dataset synthesis without Ray: quality signals on clips with known answers, filters, captions, prompt
hygiene, WebDataset shards (exactly-once naming, orphans), the Parquet index, and the dataset card's code
run against real outputs (local, and S3 on moto's server)."""

from __future__ import annotations

import io
import json
import re
import runpy
import subprocess
import sys
import tarfile

import cv2
import fsspec
import numpy as np
import pyarrow as pa
import pytest
import torch
import webdataset as wds
from pydantic import ValidationError
from safetensors.torch import load as unpack_tensors

from kvray.config.dataset import SIGNALS, DatasetConfig, QualityFilter, filter_reasons
from kvray.config.validation import validation_message
from kvray.io.atomic import write_atomic
from kvray.io.dataset_card import (
    dataset_counts,
    public_storage_options,
    write_dataset_card,
)
from kvray.io.opening import open_fs
from kvray.io.shards import (
    INDEX_SCHEMA,
    Sample,
    build_shard,
    committed_keys,
    index_row,
    index_table,
    read_index,
    remove_orphans,
    sample_bytes,
    scan_shards,
    shard_name,
    split_samples,
    tar_size,
    write_samples,
)
from kvray.io.video import read_video
from kvray.pipeline import Video, VideoRequest
from kvray.pipeline.quality import quality_fields, quality_signals
from kvray.pipeline.samples import caption, dataset_sample, video_metadata
from kvray.requests.manifest import video_id
from kvray.requests.prompts import count_duplicates, normalise_prompt, prompt_key

STAGES = ("text", "keyframes", "interpolate", "decode")


# ----------------------------------------------------------------------------- synthetic clips


def texture(height: int, width: int, cell: int = 8, seed: int = 0) -> np.ndarray:
    """Random colours on a grid of `cell` px, smoothly interpolated: texture everywhere, trackable."""
    rng = np.random.default_rng(seed)
    rows, cols = height // cell + 2, width // cell + 2
    small = rng.integers(0, 256, (rows, cols, 3), dtype=np.uint8)
    return cv2.resize(small, (cols * cell, rows * cell), interpolation=cv2.INTER_CUBIC)[:height, :width]


def panning(size: int, step: int, frames: int = 16) -> np.ndarray:
    """A window moving `step` px per frame to the right over a texture: (frames, size, size, 3)."""
    big = texture(size, size + step * frames)
    return np.stack([big[:, i * step:i * step + size] for i in range(frames)])


def still(size: int = 64, frames: int = 12) -> np.ndarray:
    return np.repeat(texture(size, size)[None], frames, axis=0)


# ----------------------------------------------------------------------------- quality signals


def test_static_clip_has_no_motion_and_is_frozen():
    signals = quality_signals(still())
    assert signals.keys() == SIGNALS.keys()
    assert signals["motion"] < 0.05
    assert signals["frozen_share"] == 1.0
    assert signals["black_share"] == signals["blank_share"] == 0.0


@pytest.mark.parametrize("size", [128, 512])
@pytest.mark.parametrize("step", [2, 5])
def test_motion_of_a_pan_is_its_step(size, step):
    signals = quality_signals(panning(size, step))
    assert signals["motion"] == pytest.approx(step, rel=0.2)
    assert signals["frozen_share"] == 0.0


def test_black_clip_is_black_and_blank():
    signals = quality_signals(np.zeros((12, 64, 64, 3), np.uint8))
    assert signals["black_share"] == signals["blank_share"] == signals["frozen_share"] == 1.0
    assert signals["brightness"] == signals["contrast"] == signals["sharpness"] == 0.0


def test_blur_lowers_sharpness():
    sharp = panning(128, 2)
    blurred = np.stack([cv2.GaussianBlur(frame, (0, 0), 2.0) for frame in sharp])
    assert quality_signals(blurred)["sharpness"] < 0.5 * quality_signals(sharp)["sharpness"]


def test_brightness_and_contrast_of_known_images():
    grey = np.full((4, 32, 32, 3), 100, np.uint8)
    signals = quality_signals(grey)
    assert signals["brightness"] == pytest.approx(100) and signals["contrast"] == pytest.approx(0)
    assert signals["blank_share"] == 1.0 and signals["black_share"] == 0.0
    halves = np.zeros((4, 32, 32, 3), np.uint8)
    halves[:, :, 16:] = 255  # half black, half white: mean 127.5, standard deviation 127.5
    signals = quality_signals(halves)
    assert signals["brightness"] == pytest.approx(127.5) and signals["contrast"] == pytest.approx(127.5)
    assert signals["black_share"] == 0.0 and signals["blank_share"] == 0.0


def test_scene_cuts_are_not_motion():
    movie = np.concatenate([still(64, 8), np.repeat(texture(64, 64, seed=1)[None], 8, axis=0)])
    assert quality_signals(movie)["frozen_share"] < 1.0
    across = quality_signals(movie, scene_starts=[8])
    assert across["frozen_share"] == 1.0 and across["motion"] < 0.05


def test_single_frame_has_no_motion_and_fails_a_motion_filter():
    fields = quality_fields(still(frames=1), [QualityFilter.model_validate("motion>=0.5")])
    assert fields["quality"]["motion"] is None and fields["quality"]["frozen_share"] is None
    assert fields["status"] == "filtered" and "not measured" in fields["filter_reasons"][0]


def test_quality_fields_mark_filtered_samples_with_reasons():
    filters = DatasetConfig(filters=["motion>=0.5", "black_share<0.5"]).filters
    fields = quality_fields(np.zeros((6, 32, 32, 3), np.uint8), filters)
    assert fields["status"] == "filtered" and len(fields["filter_reasons"]) == 2
    assert quality_fields(panning(64, 2), filters) | {"quality": None} == {
        "quality": None, "status": "ok", "filter_reasons": []}


def test_signal_registry_imports_without_opencv():
    code = "import sys, kvray.config.dataset as d; assert d.SIGNALS and 'cv2' not in sys.modules, sys.modules.keys()"
    subprocess.run([sys.executable, "-c", code], check=True)


# ----------------------------------------------------------------------------- filters and config


def test_filters_parse_and_evaluate():
    config = DatasetConfig(layout="webdataset", filters=["motion>=0.5", " black_share < 0.1 ", "sharpness>1e2"],
                           keep_filtered=False)
    assert [str(f) for f in config.filters] == ["motion>=0.5", "black_share<0.1", "sharpness>100"]
    signals = {"motion": 0.4, "black_share": 0.0, "sharpness": 100.0}
    assert filter_reasons(config.filters, signals) == ["motion 0.4 fails motion>=0.5", "sharpness 100 fails sharpness>100"]
    assert filter_reasons(config.filters, {"motion": 0.5, "black_share": 0.09, "sharpness": 101}) == []
    assert DatasetConfig(filters="contrast<=3").filters == (QualityFilter(signal="contrast", op="<=", value=3),)
    assert DatasetConfig(filters=[{"signal": "motion", "op": ">", "value": 1}]).filters[0].value == 1.0


@pytest.mark.parametrize(("settings", "says"), [
    ({"filters": ["wobble>=1"]}, "unknown quality signal 'wobble'"),
    ({"filters": ["motion=>0.5"]}, "unknown operator '=>'"),
    ({"filters": ["motion==0.5"]}, "unknown operator '=='"),
    ({"filters": ["motion>=fast"]}, "'fast' is not a number"),
    ({"filters": ["motion>=nan"]}, "finite"),
    ({"filters": ["motion"]}, "is not SIGNAL OP NUMBER"),
    ({"layout": "tar"}, "'files' or 'webdataset'"),
    ({"layout": "webdataset", "shard_size": 0}, "greater than 0"),
    ({"layout": "webdataset", "shard_bytes": "0B"}, "greater than 0"),
    ({"layout": "webdataset", "shard_bytes": "lots"}, "shard_bytes: could not parse value and unit"),
    ({"shard_size": 10}, "apply to layout webdataset only"),
    ({"with_latents": True}, "apply to layout webdataset only"),
])
def test_bad_dataset_settings_are_one_clear_error(settings, says):
    with pytest.raises(ValidationError) as err:
        DatasetConfig.model_validate(settings)
    message = validation_message(err.value, "dataset")
    assert says in message and "\n" not in message


def test_shard_bytes_take_units():
    assert DatasetConfig(layout="webdataset", shard_bytes="1GiB").shard_bytes == 2**30
    assert DatasetConfig(layout="webdataset", shard_bytes=1000).shard_bytes == 1000
    assert DatasetConfig(with_latents=False).layout == "files"  # a setting that changes nothing is fine


# ----------------------------------------------------------------------------- captions and prompts


def test_captions_are_the_prompt_or_the_timed_scenes():
    plain = Video(VideoRequest(prompt="a red car", width=64, height=64, seed=1), still(frames=12))
    assert caption(plain.scenes) == "a red car"
    movie = Video(VideoRequest(scenes=["a seed", "a sprout", "a tree"], width=64, height=64, seed=1), still(frames=36))
    assert caption(movie.scenes).splitlines() == [
        "[0.00s-5.50s] a seed", "[5.50s-11.00s] a sprout", "[11.00s-16.50s] a tree"]


def test_prompts_normalise_and_duplicates_count():
    assert normalise_prompt("  Ａ  Red\tCAR\n") == "a red car"
    assert normalise_prompt("Straße") == normalise_prompt("STRASSE")
    assert prompt_key("A cat") == prompt_key("a  cat") == prompt_key(["a cat"])
    assert prompt_key(["a", "b"]) != prompt_key(["a b"])
    report = count_duplicates(["a cat", "A  CAT", "a dog", ["a", "b"], ["A", "B "], "a cat"])
    assert (report.rows, report.distinct, report.duplicate_rows) == (6, 3, 3)
    assert report.most_repeated == (("a cat", 3), ("a | b", 2))
    assert "3 duplicate rows" in report.line()
    assert count_duplicates(["x", "y"]).line() == "prompts: 2 rows, no duplicates after normalisation"


# ----------------------------------------------------------------------------- samples


def make_sample(index: int, *, frames: np.ndarray | None = None, scenes: list[str] | None = None,
                camera=None, latents: bool = False) -> Sample:
    """A sample as the decode stage builds it: a real mp4, the renderer's metadata, quality fields
    (filter motion>=2.5: pans of 1 and 2 px per frame are filtered)."""
    if camera is not None:
        request = VideoRequest(prompt=f"prompt {index}", mode="animation", camera=camera, width=64, height=64, seed=index)
    elif scenes:
        request = VideoRequest(scenes=scenes, width=64, height=64, seed=index)
    else:
        request = VideoRequest(prompt=f"prompt {index}", width=64, height=64, seed=index)
    video = Video(request, panning(32, 1 + index % 3, frames=12) if frames is None else frames)
    key = video_id(request, "test-model")
    metadata = video_metadata(video, row_id=f"row-{index}", video_id=key, model_version="test-model",
                              video_format="mp4", seconds={s: 0.5 for s in STAGES},
                              placement={"keyframes": {"gpu_ids": ["0"]}, "decode": {"gpu_ids": ["1"]}}, uri="")
    dataset = DatasetConfig(layout="webdataset", with_latents=latents, filters=["motion>=2.5"])
    return dataset_sample(video, metadata, dataset, encoded=video.encode("mp4"),
                          latents=torch.full((12, 4, 4, 4), float(index)) if latents else None)


@pytest.fixture(scope="module")
def samples() -> list[Sample]:
    return [make_sample(i) for i in range(40)]


def test_samples_carry_quality_caption_and_latents():
    sample = make_sample(4, scenes=["a", "b"], frames=panning(32, 2, frames=24), latents=True)
    assert sample.metadata["status"] == "filtered" and sample.metadata["quality"]["motion"] == pytest.approx(2, rel=0.2)
    assert sample.caption == "[0.00s-5.50s] a\n[5.50s-11.00s] b"
    assert torch.equal(unpack_tensors(sample.members["latents.safetensors"])["latents"], torch.full((12, 4, 4, 4), 4.0))
    with pytest.raises(ValueError, match="no latents"):
        dataset_sample(Video(VideoRequest(prompt="x", width=64, height=64, seed=0), still(32)), sample.metadata,
                       DatasetConfig(layout="webdataset", with_latents=True), encoded=b"")


def test_samples_travel_as_plain_rows():
    sample = make_sample(5, latents=True)
    back = Sample.from_row(pa.Table.from_pylist([sample.to_row()]).to_pylist()[0])
    assert back.members == sample.members and back.metadata == sample.metadata
    assert Sample.from_row(make_sample(6).to_row()).latents is None


def test_sample_keys_must_be_plain_names():
    with pytest.raises(ValueError, match="dot"):
        Sample(key="a.b", video=b"", metadata={}, caption="")
    with pytest.raises(ValueError):
        Sample(key="a/b", video=b"", metadata={}, caption="")


def test_tar_size_is_exact_and_every_member_reads_back(samples, tmp_path):
    group = samples[:5]
    tar = build_shard(group)
    assert len(tar) == tar_size(sum(sample_bytes(s) for s in group))
    assert build_shard(group) == tar  # the same samples, the same bytes
    (tmp_path / "s.tar").write_bytes(tar)
    read = list(wds.WebDataset(str(tmp_path / "s.tar"), shardshuffle=False))
    assert [r["__key__"] for r in read] == [s.key for s in group]
    for sample, got in zip(group, read):
        assert {k: got[k] for k in sample.members} == sample.members


def test_split_keeps_shards_within_their_targets(samples):
    sizes = [sample_bytes(s) for s in samples]
    budget = tar_size(3 * max(sizes))
    shards = split_samples(samples[::-1], shard_size=7, shard_bytes=budget)
    assert sorted(s.key for shard in shards for s in shard) == sorted(s.key for s in samples)
    for shard in shards:
        assert len(shard) <= 7 and len(build_shard(shard)) <= budget
    assert [len(s) for s in split_samples(samples, 7, 10**9)] == [7, 7, 7, 7, 7, 5]
    assert all(len(s) == 1 for s in split_samples(samples[:3], 7, 1))  # a sample larger than the target: alone
    with pytest.raises(ValueError):
        split_samples(samples, 0, 10)


def test_shard_names_follow_their_members(samples):
    names = [s.member_names for s in samples[:4]]
    assert shard_name(names[0] + names[1]) == shard_name(names[1] + names[0])
    assert shard_name(names[0] + names[1]) != shard_name(names[0] + names[2])
    with_latents = make_sample(0, latents=True)
    assert with_latents.key == samples[0].key and shard_name(with_latents.member_names) != shard_name(names[0])
    assert re.fullmatch(r"[0-9a-f]{32}", shard_name(names[0]))


def _files(root) -> dict[str, bytes]:
    """Relative path -> content of every file under `root`."""
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_retried_batch_rewrites_the_same_shards(samples, tmp_path):
    fs, root = open_fs(str(tmp_path))
    dataset = DatasetConfig(layout="webdataset", shard_size=8)
    first = write_samples(fs, root, samples[:20], dataset)
    files = _files(tmp_path)
    again = write_samples(fs, root, samples[:20][::-1], dataset)  # the same batch, in another order
    assert again == first and _files(tmp_path) == files  # the same objects, the same bytes
    # Killed after the tar of its second shard: the retry completes that shard, nothing else appears.
    (tmp_path / "index" / f"{first.shards[1].name}.parquet").unlink()
    assert write_samples(fs, root, samples[:20], dataset) == first and _files(tmp_path) == files
    assert [len(s.keys) for s in first.shards] == [8, 8, 4]
    assert committed_keys(fs, root) == {s.key for s in samples[:20]}
    index = read_index(fs, root)
    assert index.num_rows == 20 and len(set(index["key"].to_pylist())) == 20


def test_orphans_are_found_and_removed(samples, tmp_path):
    fs, root = open_fs(str(tmp_path))
    dataset = DatasetConfig(layout="webdataset", shard_size=4)
    written = write_samples(fs, root, samples[:8], dataset)
    # A writer killed between the tar and its index part; an index part whose tar is gone; a local temp file.
    write_atomic(fs, f"{root}/shards/{'f' * 32}.tar", build_shard(samples[8:10]))
    (tmp_path / "shards" / f"{written.shards[1].name}.tar").unlink()
    (tmp_path / "index" / ".x.parquet.0123.tmp").write_bytes(b"half")
    scan = scan_shards(fs, root)
    assert scan.committed == (written.shards[0].name,)
    assert sorted(p.rpartition("/")[2] for p in scan.orphans) == sorted(
        [f"{'f' * 32}.tar", f"{written.shards[1].name}.parquet", ".x.parquet.0123.tmp"])
    assert committed_keys(fs, root) == set(written.shards[0].keys)  # samples 4..7 and 8..9 render again
    assert sorted(remove_orphans(fs, root)) == sorted(scan.orphans)
    assert scan_shards(fs, root).orphans == () and remove_orphans(fs, root) == []


def test_dropped_samples_are_committed_but_not_in_shards(tmp_path):
    group = [make_sample(i) for i in range(6)]  # pans of 1, 2, 3 px: the filter motion>=2.5 drops 1 and 2
    dropped = {s.key for s in group if s.filtered}
    assert 0 < len(dropped) < 6
    fs, root = open_fs(str(tmp_path))
    written = write_samples(fs, root, group, DatasetConfig(layout="webdataset", keep_filtered=False))
    assert set(written.dropped) == dropped and not dropped & set(written.shards[0].keys)
    assert committed_keys(fs, root) == {s.key for s in group}
    counts = dataset_counts(fs, root)
    assert (counts.ok, counts.filtered, counts.dropped, counts.shards) == (6 - len(dropped), 0, len(dropped), 1)
    kept = write_samples(fs, open_fs(str(tmp_path / "kept"))[1], group, DatasetConfig(layout="webdataset"))
    assert len(kept.shards[0].keys) == 6 and kept.dropped == ()


# ----------------------------------------------------------------------------- index


def test_index_columns_are_stable_and_flat():
    group = [make_sample(0), make_sample(1, scenes=["a", "b"], frames=panning(32, 2, frames=24), latents=True),
             make_sample(2, camera=[{"frame": 0}, {"frame": 95, "zoom": 1.5}], frames=panning(32, 1, frames=12))]
    table = index_table([index_row(s, "shards/x.tar") for s in group])
    assert table.schema.equals(INDEX_SCHEMA)
    row = table.to_pylist()[1]
    assert row["members"] == sorted(f"{group[1].key}.{e}" for e in ("json", "latents.safetensors", "mp4", "txt"))
    assert row["request_scenes"] == ["a", "b"] and [s["prompt"] for s in row["scenes"]] == ["a", "b"]
    assert row["seconds_decode"] == 0.5 and json.loads(row["placement"])["decode"]["gpu_ids"] == ["1"]
    assert row["fps"] == pytest.approx(24 / 11) and row["request_fps"] == "low"
    assert row["motion"] == group[1].metadata["quality"]["motion"]
    assert '"zoom": 1.5' in table.to_pylist()[2]["request_camera"]
    assert pa.concat_tables([table, index_table([index_row(make_sample(3), None)])]).num_rows == 4
    with pytest.raises(ValueError, match="new_field"):
        index_row(Sample(key="k", video=b"", metadata={**group[0].metadata, "new_field": 1}, caption=""), None)


def test_index_locates_each_video_inside_its_shard(samples, tmp_path):
    fs, root = open_fs(str(tmp_path))
    write_samples(fs, root, samples[:6], DatasetConfig(layout="webdataset"))
    by_key = {s.key: s for s in samples}
    for row in read_index(fs, root, ["key", "shard", "video_offset", "video_size"]).to_pylist():
        with open(tmp_path / row["shard"], "rb") as fh:
            fh.seek(row["video_offset"])
            assert fh.read(row["video_size"]) == by_key[row["key"]].video
    with tarfile.open(tmp_path / row["shard"]) as archive:
        assert len(archive.getnames()) == 6 * 3


# ----------------------------------------------------------------------------- the card, run for real


def _card_code(card: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", card, flags=re.DOTALL)


def _write_dataset(fs, root, group, storage_options=None):
    dataset = DatasetConfig(layout="webdataset", shard_size=8, filters=["motion>=2.5"])
    write_samples(fs, root, group, dataset)
    return write_dataset_card(fs, root, counts=dataset_counts(fs, root), errors=2, dataset=dataset,
                              model_version="test-model", preset="tiny", storage_options=storage_options or {},
                              defaults={"fps": "low", "motion": "medium", "width": 64, "height": 64})


def _run_card(card: str, monkeypatch, tmp_path) -> dict:
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    script = tmp_path / "card.py"
    script.write_text("\n".join(_card_code(card)))
    return runpy.run_path(str(script))


def _check_card_results(namespace: dict, count: int) -> None:
    assert namespace["index"].num_rows == count
    assert set(INDEX_SCHEMA.names) <= set(namespace["index"].column_names)
    assert 0 < namespace["moving"].num_rows < count
    first = namespace["first"]
    assert first["frames"].shape == (12, 32, 32, 3) and first["caption"].startswith("prompt ")
    assert first["meta"]["quality"].keys() == SIGNALS.keys()
    assert namespace["frames"].shape == (4, 12, 32, 32, 3) and len(namespace["captions"]) == 4


def test_card_code_runs_on_a_local_dataset(samples, tmp_path, monkeypatch):
    out = tmp_path / "out"
    fs, root = open_fs(str(out))
    _write_dataset(fs, root, samples[:20])
    card = (out / "README.md").read_text()
    assert "| samples | 20 (ok " in card and "| errors (rows that did not render) | 2 |" in card
    assert "`motion>=2.5`" in card and "gopen_schemes[" not in card
    _check_card_results(_run_card(card, monkeypatch, tmp_path), 20)
    written = (out / "README.md").stat().st_mtime_ns
    _write_dataset(fs, root, samples[:20])  # a re-run: nothing changes, nothing is written
    assert (out / "README.md").stat().st_mtime_ns == written
    import datasets

    # The card's YAML header makes the directory itself loadable (and the hub viewer read the index).
    assert datasets.load_dataset(str(out), split="train").num_rows == 20


def test_round_trip_on_s3(samples, s3_bucket, tmp_path, monkeypatch):
    fs = fsspec.filesystem("s3", **s3_bucket.storage_options)
    root = f"{s3_bucket.name}/dataset"
    card_uri = _write_dataset(fs, root, samples, s3_bucket.storage_options)
    counts = dataset_counts(fs, root)
    assert counts.samples == 40 and counts.shards == 5
    card = fs.cat_file(f"{root}/README.md").decode()
    assert card_uri == f"s3://{root}/README.md" and f'root = "s3://{root}"' in card
    assert "secret" not in card and s3_bucket.endpoint_url in card  # the endpoint, never the credentials
    namespace = _run_card(card, monkeypatch, tmp_path)
    _check_card_results(namespace, 40)
    assert len(namespace["shards"]) == 5 and all(s.startswith("s3://") for s in namespace["shards"])
    # Every sample streams straight from S3 exactly once, and its video decodes with PyAV.
    streamed = list(wds.WebDataset(namespace["shards"], shardshuffle=False))
    assert sorted(s["__key__"] for s in streamed) == sorted(s.key for s in samples)
    frames, _ = read_video(io.BytesIO(streamed[0]["mp4"]).getvalue())
    assert frames.shape == (12, 32, 32, 3)


def test_public_storage_options_drop_secrets():
    options = {"key": "k", "secret": "s", "client_kwargs": {"endpoint_url": "http://h:1", "aws_session_token": "t"}}
    assert public_storage_options(options) == {"client_kwargs": {"endpoint_url": "http://h:1"}}
