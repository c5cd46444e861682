"""`kvray bench startup`: how long a user waits for the example's first video, and for a run with
nothing to do, as the README's command is run (`kvray render MANIFEST --out DIR`, a fresh process).

Each run renders the manifest into a fresh folder, timed from the command's start to the first mp4 in
place (videos are written whole, then renamed: present means done) and to the command's end; the run's
record says how much of it was start-up (Ray, the id pass, the done listing, planning). The same
command again on the same folder has nothing to do. The Python and kvray imports of a command are
timed on their own (`kvray --version`). Figures are medians over `--runs`; the machine's load is
printed with them, since a busy machine's seconds are not a quiet one's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

POLL_SECONDS = 0.05


def _command(*args: str) -> list[str]:
    return [sys.executable, "-m", "kvray.cli", *args]


def _first_mp4(out: Path) -> bool:
    videos = out / "videos"
    return videos.is_dir() and any(videos.rglob("*.mp4"))


def _timed_render(manifest: str, out: Path, timeout: float) -> dict:
    """Seconds to the first mp4 (None if none came) and to the end of one `kvray render`, and its record."""
    start = time.perf_counter()
    process = subprocess.Popen(_command("render", manifest, "--out", str(out)), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    first = None
    while process.poll() is None:
        if first is None and _first_mp4(out):
            first = time.perf_counter() - start
        if time.perf_counter() - start > timeout:
            process.kill()
            raise TimeoutError(f"kvray render {manifest} did not end within {timeout:g} s")
        time.sleep(POLL_SECONDS)
    total = time.perf_counter() - start
    if first is None and _first_mp4(out):
        first = total
    if process.returncode not in (0, 1):
        raise RuntimeError(f"kvray render exited {process.returncode}: {process.stderr.read()[-2000:]}")
    record = json.loads((out / "run.json").read_text())
    return {"first_mp4": first, "total": total, "summary": record.get("summary", {})}


def bench_startup(manifest: str, runs: int = 5, folder: str | None = None, timeout: float = 600.0) -> dict:
    """Per run: the first mp4, the whole render, its start-up, and the same command with nothing to do."""
    base = Path(folder or tempfile.mkdtemp(prefix="kvray-startup-"))
    rows = []
    for index in range(runs):
        out = base / f"run-{index}"
        if out.exists():
            raise FileExistsError(f"{out} exists: give an empty --out folder")
        fresh = _timed_render(manifest, out, timeout)
        again = _timed_render(manifest, out, timeout)
        if again["summary"].get("ok"):
            raise RuntimeError(f"the second run rendered {again['summary']['ok']} videos: it should find them done")
        started = time.perf_counter()
        subprocess.run(_command("--version"), check=True, capture_output=True)
        rows.append({"first_mp4": fresh["first_mp4"], "total": fresh["total"],
                     "startup": fresh["summary"].get("startup_seconds"), "ok": fresh["summary"].get("ok"),
                     "busy": fresh["summary"].get("busy_seconds", {}), "nothing_to_do": again["total"],
                     "imports": time.perf_counter() - started})
    return {"runs": rows, "folder": str(base), "load": os.getloadavg(), "cpus": os.cpu_count()}


def _median(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if r[key] is not None]
    return statistics.median(values) if values else None


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def print_report(result: dict, manifest: str, out=sys.stdout) -> None:
    rows = result["runs"]
    load = ", ".join(f"{x:.1f}" for x in result["load"])
    print(f"kvray render {manifest} --out DIR, {len(rows)} runs, {result['cpus']} CPUs, load average {load} "
          f"(outputs in {result['folder']})", file=out)
    print(f"{'run':>5} {'first mp4':>10} {'render':>8} {'start-up':>9} {'nothing to do':>14} {'imports':>8}", file=out)
    for index, row in enumerate(rows):
        print(f"{index:>5} {_seconds(row['first_mp4']):>10} {_seconds(row['total']):>8} {_seconds(row['startup']):>9} "
              f"{_seconds(row['nothing_to_do']):>14} {_seconds(row['imports']):>8}", file=out)
    medians = {key: _median(rows, key) for key in ("first_mp4", "total", "startup", "nothing_to_do", "imports")}
    print(f"{'median':>6}{_seconds(medians['first_mp4']):>10} {_seconds(medians['total']):>8} "
          f"{_seconds(medians['startup']):>9} {_seconds(medians['nothing_to_do']):>14} {_seconds(medians['imports']):>8}",
          file=out)
    if medians["first_mp4"] is None:
        print("could not measure the first video: no run wrote an mp4", file=out)
        return
    busy = {stage: statistics.median(r["busy"].get(stage, 0.0) for r in rows) for stage in rows[0]["busy"]}
    imports, startup = medians["imports"] or 0.0, medians["startup"] or 0.0
    print(f"where the first video's seconds go (medians): Python and kvray's imports {imports:.1f} s; Ray, the id "
          f"pass, the done listing and planning {startup:.1f} s; the pools starting (their imports and models) and "
          f"the first video through them {medians['first_mp4'] - imports - startup:.1f} s", file=out)
    print("stage busy seconds over the whole render: " + ", ".join(f"{s} {v:.1f}" for s, v in busy.items()), file=out)


def add_startup_parser(bench) -> None:
    p = bench.add_parser("startup", help="seconds to the example's first video, and of a run with nothing to do",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--manifest", default="examples/prompts.parquet", help="the manifest to render")
    p.add_argument("--runs", type=int, default=5, help="runs; the figures are medians")
    p.add_argument("--out", default=None, help="an empty folder for the runs' outputs (default: a temporary one)")
    p.set_defaults(run=_run)


def _run(args) -> int:
    if args.runs < 1:
        print("error: --runs must be at least 1", file=sys.stderr)
        return 2
    print_report(bench_startup(args.manifest, args.runs, args.out), args.manifest)
    return 0
