"""The stage workers as a render's driver hands them to Ray Data: classes that import their stage's code
(`workers`: torch, the networks, the codecs) in the actor that constructs them. The driver only plans
rows and starts pools, so it never loads torch (about 1.3 s of every render's start-up)."""

from __future__ import annotations

from ..config.stages import STAGES


class DeferredWorker:
    """Builds `workers.WORKERS[stage]` in the actor; every call goes to it."""

    stage: str

    def __init__(self, *args, **kwargs):
        from .workers import WORKERS

        self.worker = WORKERS[self.stage](*args, **kwargs)

    def __call__(self, batch):
        yield from self.worker(batch)

    def run(self, batch):
        return self.worker.run(batch)


DEFERRED_WORKERS: dict[str, type] = {
    stage: type(f"{stage.capitalize()}Stage", (DeferredWorker,), {"stage": stage}) for stage in STAGES
}
