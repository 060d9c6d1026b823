"""Errors about a spec that make an object ``Valid=False``, shared by every adapter (layer 1).

:class:`SpecError` is the base the controller catches: ``traffic.router.RouterError`` (a route
cannot be used) and ``metrics.errors.ProviderError`` (a metric provider, its Secret or a metric
template cannot be used) both derive from it, so their messages read the same.
"""

from __future__ import annotations

from pydantic import ValidationError


class SpecError(Exception):
    """A spec field at fault; ``str()`` is ``"<field>: <message>"``, the text of ``Valid=False``."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def validation_message(err: ValidationError) -> str:
    """The first pydantic errors (up to three) as 'spec.a.b: message', joined by '; '."""
    parts = []
    for e in err.errors()[:3]:
        loc = ".".join(str(p) for p in e["loc"])
        parts.append(f"spec.{loc}: {e['msg']}")
    return "; ".join(parts)
