"""Argument types and options shared by the subcommands."""
from __future__ import annotations

import argparse
import math


def finite_float(text: str) -> float:
    """An argparse type: a finite number (--alpha nan, inf or garbage is a usage error)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def count(text: str) -> int:
    """An argparse type: an integer >= 0 (threads, examples)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is negative")
    return value


def add_follow_links(p) -> None:
    p.add_argument("--follow-links", action="store_true", help="read files of model directories through symbolic "
                   "links wherever they point (default: only links inside the directory or into a Hugging Face "
                   "cache's blobs/)")


def model_path(text: str) -> str:
    """An argparse type: a model directory or file, or the id of a model in the Hugging Face cache (deltapack.hub)."""
    from .. import hub

    if not hub.looks_like_id(text):
        return text  # a path, existing or not: the command opens it and says what is wrong
    try:
        return hub.resolve(text)
    except FileNotFoundError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
