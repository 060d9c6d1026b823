"""The ``kubectl mlrollouts`` plugin: see :mod:`model_rollouts.cli.app`."""

from model_rollouts.cli.app import cli, main

__all__ = ["cli", "main"]
