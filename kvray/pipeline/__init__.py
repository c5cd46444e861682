"""The generation path in one process: requests -> text -> keyframes -> interpolation -> frames."""

from ..requests.request import NUM_FRAMES, VideoRequest
from .pipeline import Video, VideoPipeline, load_first_frames, with_seed

__all__ = ["NUM_FRAMES", "Video", "VideoPipeline", "VideoRequest", "load_first_frames", "with_seed"]
