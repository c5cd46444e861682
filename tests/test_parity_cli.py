"""`kvray parity` and `kvray layout` as a user runs them."""

from __future__ import annotations

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from kvray.cli import main


def test_parity_on_the_golden_directory(golden_dir, capsys):
    assert main(["parity", str(golden_dir)]) == 0
    lines = capsys.readouterr().out.splitlines()
    calls = [line for line in lines if line.endswith(" ok") and not line.startswith("schedulers ")]
    expected = sum(len(json.loads(p.read_text())["calls"]) for p in golden_dir.glob("*.json") if p.name != "schedulers.json")
    assert len(calls) == expected
    for line in calls:
        network, call, diff, _ = line.split()
        assert float(diff) <= 1e-4
    assert any(line.startswith("schedulers ") for line in lines)
    assert lines[-1] == "parity: all calls within tolerance"


@pytest.fixture
def movq_golden_copy(golden_dir, tmp_path):
    for path in golden_dir.glob("image_movq.*"):
        shutil.copy(path, tmp_path / path.name)
    return tmp_path


def test_parity_fails_on_a_wrong_weight(movq_golden_copy, capsys):
    weights_path = movq_golden_copy / "image_movq.weights.safetensors"
    weights = load_file(weights_path)
    weights["decoder.conv_out.bias"] += 0.01
    save_file(weights, weights_path)
    assert main(["parity", str(movq_golden_copy)]) == 1
    out = capsys.readouterr().out
    assert "image_movq decode" in out and "FAIL" in out


def test_parity_refuses_what_it_does_not_understand(movq_golden_copy, capsys):
    (movq_golden_copy / "mystery.bin").write_bytes(b"?")
    assert main(["parity", str(movq_golden_copy)]) == 2
    assert "mystery.bin" in capsys.readouterr().err
    (movq_golden_copy / "mystery.bin").unlink()
    spec = json.loads((movq_golden_copy / "image_movq.json").read_text())
    spec["calls"][0]["args"] = ["not_recorded"]
    (movq_golden_copy / "image_movq.json").write_text(json.dumps(spec))
    assert main(["parity", str(movq_golden_copy)]) == 2
    assert "not_recorded" in capsys.readouterr().err


def test_layout_check_matches_every_manifest(manifests_dir, capsys):
    assert main(["layout", str(manifests_dir)]) == 0
    out = capsys.readouterr().out
    for count in ("4,149,077,956", "3,979,941,530", "270,603,567", "666,131,275", "33,570,816", "8,721,797,632"):
        assert f"{count} params (manifest {count}) ok" in out
    assert main(["layout", "--check", str(manifests_dir)]) == 0  # kvray 0.1's spelling still works
    same = lambda text: [line for line in text.splitlines() if not line.startswith("peak memory")]  # noqa: E731
    assert same(capsys.readouterr().out) == same(out)


def test_layout_check_reports_a_mismatch(manifests_dir, tmp_path, capsys):
    for path in manifests_dir.glob("*.json"):
        shutil.copy(path, tmp_path / path.name)
    manifest = json.loads((tmp_path / "kv11_image_movq.json").read_text())
    manifest["state_dict"]["decoder.conv_out.bias"] = [4]
    (tmp_path / "kv11_image_movq.json").write_text(json.dumps(manifest))
    assert main(["layout", str(tmp_path)]) == 1
    assert "decoder.conv_out.bias (expected (4,), got (3,))" in capsys.readouterr().out
