"""`kvray bench toyworld`: does the model show what its prompt says? Scored without learned weights.

The held-out combinations of the toy world (never seen in training) become a manifest of canonical
prompts (text2video) plus image2video rows whose first frame is a drawn scene of a held-out
combination; each model renders it through the real renderer (a local Ray, every stage's actor pool),
and `kvray.toyworld.judge` checks every video: background, object colour, shape, motion, flicker, and
for image2video whether the first frame is the given image. Printed: each criterion's share right
and the share right on every criterion at once, per model, side by side (the shipped weights against
random ones: the score must be able to fail).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from ..options import add_device_option, add_weights_options
from ..toyworld import CANONICAL, CONCEPT_SHAPES, Combo, concept_held_out_combos, held_out_combos, render, sample_scene

DEFAULT_IMAGE_ROWS = 12


def toyworld_manifest(folder: Path, *, seeds: int = 1, fps: str = "low", image_rows: int = DEFAULT_IMAGE_ROWS,
                      size: int = 64, steps: int | None = None, limit: int | None = None,
                      combos: list[Combo] | None = None) -> dict[str, dict]:
    """Writes `folder/prompts.parquet` (and the image2video rows' images under `folder/images/`); returns
    what each row id should show: {id: {"combo": ..., "image": path or None}}, with the drawn "scene" of an
    image2video row. `combos`: default the held-out combinations of the world the base model knows."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    combos = (held_out_combos() if combos is None else combos)[:limit]
    rows, expected = [], {}
    rng = np.random.default_rng(0)
    for seed in range(seeds):
        for index, combo in enumerate(combos):
            colour, shape, motion, background = combo
            prompt = CANONICAL.format(colour=colour, shape=shape, motion=motion, background=background)
            row_id = f"t2v-{index:03d}-s{seed}"
            rows.append(dict(id=row_id, prompt=prompt, seed=1000 * seed + index, image=None))
            expected[row_id] = {"combo": combo, "image": None}
    (folder / "images").mkdir(parents=True, exist_ok=True)
    for index, combo in enumerate(combos[:image_rows]):
        # The image is drawn at twice the size, as a user's larger image would be; the renderer resizes it.
        scene = sample_scene(rng, combo, score=10)
        first = render(scene, 2, 2 * size)[0]
        path = folder / "images" / f"i2v-{index:03d}.png"
        Image.fromarray(first).save(path)
        row_id = f"i2v-{index:03d}"
        prompt = CANONICAL.format(colour=combo[0], shape=combo[1], motion=combo[2], background=combo[3])
        rows.append(dict(id=row_id, prompt=prompt, seed=500 + index, image=str(path)))
        expected[row_id] = {"combo": combo, "image": str(path), "scene": scene.to_dict()}
    table = {name: [row[name] for row in rows] for name in ("id", "prompt", "seed", "image")}
    table.update(fps=[fps] * len(rows), width=[size] * len(rows), height=[size] * len(rows))
    if steps is not None:
        table["steps"] = [steps] * len(rows)
    pq.write_table(pa.table(table), folder / "prompts.parquet")
    return expected


def judge_outputs(out: str, expected: dict[str, dict]) -> tuple[list[dict], list[str]]:
    """Each rendered row judged against what it should show; the ids that did not render (with why)."""
    from PIL import Image

    from ..io.layout import latest_results
    from ..io.opening import open_fs
    from ..io.video import read_video
    from ..toyworld.judge import judge

    fs, root = open_fs(out)
    results = {row["id"]: row for row in latest_results(fs, root).to_pylist()}
    judged, failed = [], []
    for row_id, want in expected.items():
        row = results.get(row_id)
        if row is None or row["status"] not in ("ok", "skipped") or not row.get("uri"):
            failed.append(f"{row_id}: {row['status'] + ' ' + str(row.get('error')) if row else 'no result'}")
            continue
        frames, _ = read_video(fs.cat_file(open_fs(row["uri"])[1]))
        image = None
        if want["image"] is not None:
            size = frames.shape[2], frames.shape[1]
            image = np.asarray(Image.open(want["image"]).convert("RGB").resize(size, Image.BICUBIC))
        verdict = judge(frames, want["combo"], image=image)
        judged.append({"id": row_id, "combo": want["combo"], **verdict})
    return judged, failed


def bench_toyworld(models: dict, out: str, *, seeds: int = 1, fps: str = "low", image_rows: int = DEFAULT_IMAGE_ROWS,
                   steps: int | None = None, limit: int | None = None, device: str = "cpu", num_cpus: int | None = None,
                   combos: list[Combo] | None = None, say=print) -> dict:
    """Renders the held-out manifest with each of `models` ({label: ModelSource}) under `out/label` and
    scores it; returns {label: {"score": {criterion: share}, "judged": [...], "failed": [...]}}."""
    from ..config import RuntimeConfig
    from ..config.job import RenderJob
    from ..distributed.render import render as render_manifest
    from ..toyworld.judge import score

    inputs = Path(out) / "inputs"
    inputs.mkdir(parents=True, exist_ok=True)
    expected = toyworld_manifest(inputs, seeds=seeds, fps=fps, image_rows=image_rows,
                                 size=next(iter(models.values())).model_preset.default_width, steps=steps, limit=limit,
                                 combos=combos)
    report = {}
    for label, source in models.items():
        target = str(Path(out) / label)
        say(f"{label}: rendering {len(expected)} videos of held-out prompts ({source.version}) into {target}")
        job = RenderJob(manifest=str(inputs / "prompts.parquet"), out=target, models=source,
                        runtime=RuntimeConfig(device=device), ray={"num_cpus": num_cpus, "object_store_memory": 300_000_000})
        render_manifest(job)
        judged, failed = judge_outputs(target, expected)
        report[label] = {"score": score(judged) if judged else {}, "judged": judged, "failed": failed}
    return report


def print_report(report: dict, stream=sys.stdout) -> None:
    labels = list(report)
    criteria = []
    for entry in report.values():
        criteria += [c for c in entry["score"] if c not in criteria]
    print(f"{'criterion':<14}" + "".join(f"{label:>12}" for label in labels), file=stream)
    for criterion in criteria:
        cells = "".join(f"{report[label]['score'].get(criterion, float('nan')):>12.1%}" for label in labels)
        print(f"{criterion:<14}{cells}", file=stream)
    print(f"{'videos':<14}" + "".join(f"{len(report[label]['judged']):>12d}" for label in labels), file=stream)
    for label in labels:
        for line in report[label]["failed"][:5]:
            print(f"{label}: not rendered: {line}", file=stream)


def add_toyworld_parser(bench_subparsers) -> argparse.ArgumentParser:
    p = bench_subparsers.add_parser(
        "toyworld", help="render held-out toy-world prompts and judge each video without learned weights",
        description="Renders the toy world's held-out combinations (canonical prompts, text2video, plus image2video "
                    "rows) through the real renderer with the given weights and with random weights, judges every "
                    "video (background, colour, shape, motion, flicker, first frame) and prints each criterion's "
                    "share right and the share right on all at once, side by side.")
    p.add_argument("--out", required=True, help="local folder for the manifest, the videos and the report")
    p.add_argument("--seeds", type=int, default=1, help="seeds per held-out combination (default 1: 54 prompts)")
    p.add_argument("--fps", default="low", help="fps of every row (default low: the 12 keyframes)")
    p.add_argument("--image-rows", type=int, default=DEFAULT_IMAGE_ROWS,
                   help=f"image2video rows (default {DEFAULT_IMAGE_ROWS})")
    p.add_argument("--steps", type=int, help="first-frame and keyframe steps (default the official 50)")
    p.add_argument("--limit", type=int, help="only the first N held-out combinations (a quick look)")
    p.add_argument("--no-random", action="store_true", help="leave out the random-weights baseline")
    p.add_argument("--concept", choices=CONCEPT_SHAPES,
                   help="score the held-out prompts of a concept the base world lacks (a LoRA's, with --lora) instead")
    p.add_argument("--num-cpus", type=int, help="logical CPUs of the local Ray")
    p.add_argument("--preset", default="toy", help="network sizes (default toy)")
    add_weights_options(p, default=None)
    add_device_option(p, default="cpu")
    p.set_defaults(run=run_toyworld_command)
    return p


def run_toyworld_command(args) -> int:
    import json

    from ..config.models import ModelSource
    from ..weights.adapters import resolve_adapters

    base = ModelSource(preset=args.preset, weights=args.weights, cache_dir=args.cache_dir)
    # With adapters, the base model is scored beside them: what they teach, and what they cost.
    models = {}
    if args.lora:
        models["lora"] = resolve_adapters(ModelSource.model_validate({**base.model_dump(), "loras": args.lora}))
    models[("base" if args.lora else "model")] = base
    if not args.no_random:
        models["random"] = ModelSource(preset=args.preset, weights="random")
    combos = concept_held_out_combos(args.concept) if args.concept else None
    report = bench_toyworld(models, args.out, seeds=args.seeds, fps=args.fps, image_rows=args.image_rows,
                            steps=args.steps, limit=args.limit, device=args.device, num_cpus=args.num_cpus,
                            combos=combos, say=lambda line: print(line, file=sys.stderr, flush=True))
    print(f"held-out {args.concept or 'toy-world'} prompts, fps {args.fps}, weights: "
          + ", ".join(f"{label} = {source.version}" for label, source in models.items()))
    print_report(report)
    (Path(args.out) / "report.json").write_text(json.dumps(report, indent=2, default=list))
    if any(not entry["judged"] for entry in report.values()):
        print("could not measure: a model rendered no video (see the lines above)", file=sys.stderr)
        return 1
    return 0
