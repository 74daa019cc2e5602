"""Command-line argument types and early checks.

Every bad value ends in one line that names the flag and what it accepts, with exit status 2, while the
arguments are parsed: before a model loads, before any file is written. ``Parser`` is argparse with that
one-line error; the ``*_type`` factories are argparse ``type=`` callables.
"""

from __future__ import annotations

import argparse
import math
import os
import re
from typing import Callable


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage block): ``l2pd: error: argument --flag: what is wrong``."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"l2pd: error: {message} (see `{self.prog} --help`)\n")


def int_type(lo: int = 1, hi: int | None = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < lo or (hi is not None and value > hi):
            bound = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
            raise argparse.ArgumentTypeError(f"must be an integer {bound}, got {value}")
        return value

    return parse


def float_type(lo: float = 0.0, hi: float | None = None, lo_open: bool = False) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        bad_lo = value <= lo if lo_open else value < lo
        if not math.isfinite(value) or bad_lo or (hi is not None and value > hi):
            bound = ("> " if lo_open else ">= ") + f"{lo:g}" + ("" if hi is None else f" and <= {hi:g}")
            raise argparse.ArgumentTypeError(f"must be a finite number {bound}, got {text!r}")
        return value

    return parse


def list_type(item: Callable[[str], object]) -> Callable[[str], list]:
    """A non-empty comma-separated list, each entry checked by ``item``."""
    def parse(text: str) -> list:
        parts = [t.strip() for t in text.split(",") if t.strip()]
        if not parts:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
        out = []
        for part in parts:
            try:
                out.append(item(part))
            except argparse.ArgumentTypeError as exc:
                raise argparse.ArgumentTypeError(f"{part!r}: {exc}") from None
        return out

    return parse


def choices_type(allowed: tuple[str, ...]) -> Callable[[str], list[str]]:
    def one(text: str) -> str:
        if text not in allowed:
            raise argparse.ArgumentTypeError(f"expected one of {', '.join(allowed)}")
        return text

    return list_type(one)


def device_type(text: str) -> str:
    """``cpu``, ``cuda`` or ``cuda:N``, and a GPU torch can see when it says cuda (the check models load with)."""
    if text != "cpu" and re.fullmatch(r"cuda(:\d+)?", text) is None:
        raise argparse.ArgumentTypeError(f"{text!r}: expected cpu, cuda or cuda:N")
    from .models.checkpoint import check_device

    try:
        check_device(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def threads_type(text: str) -> int:
    cores = os.cpu_count() or 1
    return int_type(1, cores)(text)


def needs_matplotlib(flag: str) -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ValueError(f"{flag} needs matplotlib: pip install 'l2pd[plot]' (or leave {flag} out)") from None
