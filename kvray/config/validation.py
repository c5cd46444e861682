"""One line from a pydantic ValidationError, for the messages users read."""

from __future__ import annotations

from pydantic import ValidationError


def validation_message(err: ValidationError, whole: str) -> str:
    """Each error as `field.path: message`, joined by "; "; `whole` names what an error without a field
    is about (the request, the row, the profile)."""
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or whole}: {e['msg']}" for e in err.errors())
