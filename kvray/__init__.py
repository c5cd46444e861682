"""kvray: Kandinsky Video 1.1 on Ray.

The public API is what this module exports; everything else is internal and may change:

* `VideoPipeline`, `VideoRequest`, `Video`: videos in this process (`kvray generate`);
* `ModelSource`, `RuntimeConfig`: which networks and weights, on which device and in which precision;
* `RenderJob`, `render`: a manifest rendered on Ray (`kvray render`), and its `RenderSummary`.

Names are imported when first used, so that `import kvray` (and `kvray --help`) loads neither torch nor Ray.
"""

from __future__ import annotations

from .lazy_exports import lazy_exports

_EXPORTS = {
    "VideoPipeline": "kvray.pipeline.pipeline",
    "Video": "kvray.pipeline.pipeline",
    "VideoRequest": "kvray.requests.request",
    "ModelSource": "kvray.config.models",
    "RuntimeConfig": "kvray.config.runtime",
    "RenderJob": "kvray.config.job",
    "render": "kvray.distributed.render",
    "RenderSummary": "kvray.distributed.render",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
