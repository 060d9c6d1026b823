"""The error of a metric provider, its Secret or a metric template that an object cannot use."""

from __future__ import annotations

from model_rollouts.api.errors import SpecError


class ProviderError(SpecError):
    """A provider, Secret or template named by the spec cannot be used; ``field`` names the field.

    The message is a fixed text (never what a server or Secret holds). Same shape and ``str()`` as
    ``traffic.router.RouterError``: both are :class:`SpecError`, the controller's ``Valid=False``.
    """
