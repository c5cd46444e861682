"""kvray: Kandinsky Video 1.1 on Ray.

The public API is what this module exports; everything else is internal and may change:

* `VideoPipeline`, `VideoRequest`, `Video`: videos in this process (`kvray generate`);
* `ModelSource`, `RuntimeConfig`: which networks and weights, on which device and in which precision;
* `RenderJob`, `render`: a manifest rendered on Ray (`kvray render`), and its `RenderSummary`.

Names are imported when first used, so that `import kvray` (and `kvray --help`) loads neither torch nor Ray.
"""

from __future__ import annotations

import importlib

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


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'kvray' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
