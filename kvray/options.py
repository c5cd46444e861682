"""The command line's shared option groups: the same names, defaults and choices (taken from the
registries) for `kvray generate`, `render`, `submit` and the benchmarks, and the configs they build.

Torch-free, so that `kvray --help` and the Ray-only commands do not pay for torch.
"""

from __future__ import annotations

import argparse
from typing import get_args

from .config.models import DEFAULT_PRESET
from .config.presets import PRESETS
from .config.runtime import Precision
from .config.sampling import FPS_PASSES, MOTION_SCORES, NOISE_AUGMENTATION
from .requests.camera_path import EFFECTS

MODES = ("text2video", "image2video", "animation")


def add_preset_option(parser, default: str | None = DEFAULT_PRESET, help_default: str | None = None) -> None:
    parser.add_argument("--preset", default=default, choices=sorted(PRESETS),
                        help=f"network sizes (default {help_default or default})")


def add_weights_options(parser, default: str | None = None) -> None:
    parser.add_argument("--weights", default=default,
                        help="weights: local dir, hub repo id, fsspec URL, or 'random' "
                             + (f"(default {default})" if default else
                                "(default: the shipped weights for toy, random for tiny, "
                                "ai-forever/KandinskyVideo_1_1 for kv11)"))
    parser.add_argument("--t5", help="T5 encoder checkpoint for official weights (default google/flan-ul2)")
    parser.add_argument("--cache-dir", help="where remote weights are cached")
    parser.add_argument("--lora", action="append", metavar="PATH[:SCALE]",
                        help="LoRA adapter (from `kvray train lora`: local dir, hub repo id or fsspec URL) merged into "
                             "its network's weights at SCALE (default 1); repeatable, merged in order")


def add_device_option(parser, default: str | None = "auto") -> None:
    parser.add_argument("--device", default=default, help="auto (CUDA when present), cpu, cuda, cuda:1, ...")


def add_model_options(parser, *, weights: str | None = None) -> None:
    """Which networks, which weights, where and in which precision (`model_source`, `runtime_config`)."""
    add_preset_option(parser)
    add_weights_options(parser, weights)
    add_device_option(parser)
    parser.add_argument("--precision", default="official", choices=get_args(Precision),
                        help="official: the official dtypes with autocast on a GPU; fast: bfloat16 end to end on a GPU "
                             "(default official; float32 on the CPU either way)")
    parser.add_argument("--threads", type=int, help="CPU threads of the network calls (default: all cores); "
                        "on the CPU the frames depend on it")


def add_storage_options(parser) -> None:
    parser.add_argument("--storage-option", action="append", default=[], type=key_value, metavar="KEY=VALUE",
                        help="fsspec option, e.g. endpoint_url=http://... or secret=@env:NAME (repeatable)")


def add_request_options(parser, *, fps: str | None = None, motion: str | None = None) -> None:
    """Everything of one request but its prompt (`video_request`)."""
    parser.add_argument("--image", help="image2video: the first frame (path, URL or fsspec URI)")
    parser.add_argument("--width", type=int, help="multiple of 64 (default: the preset's: kv11 512, tiny 128, toy 64)")
    parser.add_argument("--height", type=int, help="multiple of 64 (default: the preset's: kv11 512, tiny 128, toy 64)")
    # fps and motion are checked with the rest of the request (one line naming the field), not by argparse.
    parser.add_argument("--fps", default=fps, metavar="|".join(FPS_PASSES),
                        help=f"low (12 frames), medium (45) or high (177); default {fps or 'low'}")
    parser.add_argument("--motion", default=motion, metavar="|".join(MOTION_SCORES),
                        help="motion score " + ", ".join(f"{k} {v}" for k, v in MOTION_SCORES.items())
                             + f" (default {motion or 'medium'})")
    parser.add_argument("--noise-augmentation", type=int,
                        help="diffusion time the first frame is noised to before it conditions the keyframes "
                             f"(0-999, official {NOISE_AUGMENTATION})")
    parser.add_argument("--seed", type=int, help="default: random, printed")
    parser.add_argument("--steps", type=int, help="first-frame and keyframe denoising steps (default 50)")
    parser.add_argument("--interpolation-steps", type=int, help="interpolation denoising steps (default 10)")
    parser.add_argument("--mode", choices=MODES, help="default: image2video with --image, else text2video")
    parser.add_argument("--camera", help=f"animation: {', '.join(EFFECTS)}; or a camera path as JSON, e.g. "
                        "'[{\"frame\": 0}, {\"frame\": 95, \"zoom\": 1.5, \"x\": 0.2, \"angle\": 10}]', or @FILE with it")
    parser.add_argument("--strength", type=float,
                        help="animation: re-noising of each redrawn frame, 0 (the camera move alone) to 1 (default 0.4)")
    parser.add_argument("--scene", action="append", default=[], metavar="PROMPT",
                        help="mini-movie: the prompt of the next scene (repeatable; up to 3 scenes with the prompt, "
                             "or --scene alone for every scene)")


def model_source(args):
    from .config.models import ModelSource

    return ModelSource(preset=args.preset, weights=args.weights, t5=args.t5, cache_dir=args.cache_dir,
                       loras=args.lora or ())


def runtime_config(args, **fields):
    from .config.runtime import RuntimeConfig

    given = {"device": args.device, "precision": getattr(args, "precision", None), "threads": getattr(args, "threads", None)}
    return RuntimeConfig(**{k: v for k, v in {**given, **fields}.items() if v is not None})


def video_request(args, prompt: str | None):
    """The request the options describe, for `prompt` (None: the scenes' first); a `pydantic.ValidationError`
    or a `ValueError` (a camera file that cannot be read, no prompt at all) on bad input."""
    from .config.presets import get_preset
    from .requests.request import VideoRequest, default_size

    scenes = [prompt, *args.scene] if prompt is not None and args.scene else list(args.scene) or None
    if prompt is None and not scenes:
        raise ValueError("a prompt is needed (or --scene for each scene of a mini-movie)")
    preset = get_preset(args.preset)
    width, height = default_size(args.mode, (preset.default_width, preset.default_height))
    fields = dict(prompt=prompt if prompt is not None else scenes[0], image=args.image, width=args.width or width,
                  height=args.height or height, fps=args.fps, motion=args.motion, seed=args.seed, steps=args.steps,
                  interpolation_steps=args.interpolation_steps, noise_augmentation=args.noise_augmentation,
                  mode=args.mode, camera=_camera(args.camera), strength=args.strength, scenes=scenes)
    return VideoRequest(**{k: v for k, v in fields.items() if v is not None})


def _camera(value: str | None) -> str | None:
    """--camera: an effect name, a JSON camera path, or @FILE holding the JSON."""
    if value is None or not value.startswith("@"):
        return value
    try:
        with open(value[1:]) as f:
            return f.read()
    except OSError as err:
        raise ValueError(f"cannot read the camera path {value[1:]!r}: {err}") from err


def key_value(text: str) -> str:
    """argparse type of KEY=VALUE options: refused at once when there is no key."""
    if "=" not in text or text.startswith("="):
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    return text
