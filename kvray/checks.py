"""The result of one parity check, shared by the network and scheduler checks."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CallResult:
    network: str
    call: str
    max_abs_diff: float
    tolerance: float
    note: str = ""

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.tolerance

    def line(self) -> str:
        status = "ok" if self.ok else f"FAIL (tolerance {self.tolerance:g})"
        return f"{self.network} {self.call} {self.max_abs_diff:.3e} {status}{' ' + self.note if self.note else ''}"
