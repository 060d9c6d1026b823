"""Shards beyond one process: which ModelRollouts and ModelExperiments one operator instance owns.

An object belongs to the instance named by its ``mlrollouts.io/controller-instance`` label; an
object without the label belongs to the default (unnamed) instance only. Each instance is its own
replica set with its own leader Lease, and sees only its own objects: the label selector is given
to the API server on every list and watch (Kopf's ``settings.watching.label_selectors``), so a
shard never receives, caches or handles another shard's objects.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

#: The label that assigns an object to an operator instance (Argo Rollouts' --instance-id idea).
INSTANCE_LABEL = "mlrollouts.io/controller-instance"

#: An instance name: a lowercase DNS label, so it is both a valid label value and a Lease name suffix.
_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
MAX_NAME = 40  # leaves room in a Lease name (<= 63 in practice) for the election id and a dash


def validate_instance(name: str) -> str | None:
    """Why ``name`` cannot name an instance, or None (the empty name is the default instance)."""
    if name == "":
        return None
    if len(name) > MAX_NAME:
        return f"at most {MAX_NAME} characters"
    if not _NAME.fullmatch(name):
        return "lowercase letters, digits and '-', starting and ending with a letter or digit"
    return None


def label_selector(instance: str) -> str:
    """The label selector of an instance's objects: its name, or no label at all for the default."""
    return f"{INSTANCE_LABEL}={instance}" if instance else f"!{INSTANCE_LABEL}"


def owns(instance: str, labels: Mapping[str, str] | None) -> bool:
    """Whether an object with these labels belongs to ``instance`` (what the selector selects)."""
    value = (labels or {}).get(INSTANCE_LABEL)
    return value == instance if instance else value is None


def lease_name(election_id: str, instance: str) -> str:
    """Each instance elects its own leader: the default keeps the id, a named one appends its name."""
    return f"{election_id}-{instance}" if instance else election_id
