"""`kvray generate`: one video from a prompt or an image, in this process."""

from __future__ import annotations

import sys

from ..options import (
    add_model_options,
    add_request_options,
    add_storage_options,
    model_source,
    runtime_config,
    video_request,
)
from .common import checked_models, note_weights


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("generate", help="one video from a prompt (text2video) or an image (image2video)")
    p.add_argument("prompt", nargs="?", help="the text (or --scene for each scene of a mini-movie)")
    p.add_argument("--out", required=True, help="output file (.mp4, .gif, .webp; local path or fsspec URL)")
    p.add_argument("--format", choices=["mp4", "gif", "webp"], help="default: from the --out extension")
    p.add_argument("--video-fps", type=float,
                   help="frame rate of the file (default: 24 for an animation, else each scene lasts about 5.5 s)")
    add_request_options(p)
    add_model_options(p)
    add_storage_options(p)
    p.set_defaults(run=run)


class ProgressBars:
    """One tqdm bar per stage on a terminal; elsewhere (a log file) one plain line per finished stage, since
    a bar's carriage returns garble logs. The pipeline reports (stage, step, steps)."""

    def __init__(self, stream=None):
        from tqdm import tqdm

        self._tqdm = tqdm
        self.stream = stream or sys.stderr
        self.terminal = self.stream.isatty()
        self.stage, self.bar = None, None

    def __call__(self, stage: str, index: int, total: int) -> None:
        if not self.terminal:
            if index == total - 1:
                print(f"{stage}: {total} steps done", file=self.stream, flush=True)
            return
        if stage != self.stage or index == 0:
            self.close()
            self.stage, self.bar = stage, self._tqdm(total=total, desc=f"{stage:<13}", unit="step", file=self.stream)
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def run(args) -> int:
    from pydantic import ValidationError

    from ..config.validation import validation_message
    from ..io.atomic import write_atomic
    from ..io.images import ImageError
    from ..io.opening import open_fs
    from ..io.storage_options import parse_storage_options
    from ..io.video import video_format
    from ..pipeline import VideoPipeline, load_first_frames, with_seed
    from ..pipeline.device import torch_device

    # Everything a user can get wrong is checked before any model loads, and nothing is written on error.
    try:
        request = with_seed(video_request(args, args.prompt))
        format = args.format or video_format(args.out)
        runtime = runtime_config(args)
        torch_device(runtime)
        storage_options = parse_storage_options(args.storage_option)
        images = load_first_frames([request], storage_options)
    except ValidationError as err:
        print(f"error: {validation_message(err, 'request')}", file=sys.stderr)
        return 2
    except (ImageError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        models = checked_models(model_source(args))
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    note_weights(models)
    pipeline = VideoPipeline(models, runtime)
    bars = ProgressBars()
    try:
        video = pipeline.generate([request], images=images, progress=bars)[0]
    finally:
        bars.close()
    fs, path = open_fs(args.out, storage_options)
    write_atomic(fs, path, video.encode(format, fps=args.video_fps))
    print(f"wrote {args.out}: {len(video.frames)} frames {request.width}x{request.height}, seed {request.seed}")
    return 0
