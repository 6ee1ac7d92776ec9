"""Argparse ``type=`` converters and help texts shared by ``igconda`` and ``ray_jobs``.

A count of 0 or below (``--batch-size 0``, ``--num-workers -1``) is refused when the command line
is parsed, with argparse's usage message and exit code 2, instead of being silently replaced by a
default (``args.batch_size or default`` treats 0 as unset) or failing later inside Ray.
"""

from __future__ import annotations

import argparse

#: ``--tracking-uri`` help of every job; the order is igconda.tracking.resolve_tracking_uri's.
TRACKING_URI_HELP = ("MLflow URI (default: the config's tracking.tracking_uri, else "
                     "$MLFLOW_TRACKING_URI, else sqlite:///<output>/mlflow.db)")


def _number(text: str, kind: type, name: str) -> int | float:
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {name}, got {text!r}") from None


def positive_int(text: str) -> int:
    """An integer >= 1 (batch sizes, workers, epochs, threads, strides)."""
    value = int(_number(text, int, "an integer >= 1"))
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """An integer >= 0 (limits where 0 means "no limit", e.g. ``--max-slices``)."""
    value = int(_number(text, int, "an integer >= 0"))
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {value}")
    return value


def positive_float(text: str) -> float:
    """A number > 0 (CPUs a Ray worker reserves)."""
    value = float(_number(text, float, "a number > 0"))
    if not value > 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text}")
    return value


def non_negative_float(text: str) -> float:
    """A number >= 0 (Ray resources where 0 is valid, e.g. GPUs per actor on a CPU machine)."""
    value = float(_number(text, float, "a number >= 0"))
    if not value >= 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value
