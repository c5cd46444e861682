"""`kvray bench dataset` on the tiny preset: the figures print, bad sizes are refused."""

from __future__ import annotations

import pytest

from kvray.cli import main


def test_bench_dataset_prints_the_share(tmp_path, capsys):
    code = main(["bench", "dataset", "--sizes", "64", "--fps", "low", "--samples", "2", "--device", "cpu",
                 "--out", str(tmp_path)])
    assert code == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("64x64"))
    share = float(row.split()[-2].rstrip("%"))
    assert share > 0
    assert list((tmp_path / "64x64" / "0" / "index").glob("*.parquet"))  # the timed shard was committed


def test_bench_dataset_refuses_bad_sizes(capsys):
    assert main(["bench", "dataset", "--sizes", "100"]) == 2
    assert "multiple of 64" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "dataset", "--sizes", "big"])
