"""The traffic-router interface. One file per implementation; only weights are ever written."""

from __future__ import annotations

from typing import Protocol

from model_rollouts.api.errors import SpecError


class RouterError(SpecError):
    """The router's target cannot be used; ``field`` names the spec field at fault."""


class NotOptedIn(RouterError):
    """The route does not let this object manage its weights; retrying cannot change that."""


class TrafficRouter(Protocol):
    def check(self, services: list[str]) -> None:
        """Raise RouterError unless every service can be weighted by this router."""
        ...

    def get_weights(self) -> dict[str, int]:
        """Current weight per service, as the data plane sees it."""
        ...

    def set_weights(self, weights: dict[str, int]) -> dict[str, int]:
        """Set the weight of each given service, touching nothing else; no write if already so.

        Returns the weights the route carries afterwards, as the API server stored them (read
        back), so the caller verifies instead of assuming.
        """
        ...
