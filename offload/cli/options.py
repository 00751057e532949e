"""What every ``offload`` command shares: one-line errors, checked argument types, help with defaults.

Arguments are checked where they enter (argparse types), so a bad value is refused in one line with
exit code 2 before anything is converted, loaded or measured.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any, NoReturn

from .._memory import parse_bytes


class UsageError(Exception):
    """A problem with what the user asked for: reported in one line, exit code 2."""


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (``offload run: error: ...``), not the usage block."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: X)`` after each option's help; options whose default is computed say it in their help."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def verbose_parent() -> Parser:
    """``-v/--verbose``, accepted after the subcommand too."""
    p = Parser(add_help=False)
    p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                   help="log what offload decides (budgets, readers)")
    return p


def add_command(sub: Any, name: str, help: str, description: str | None = None) -> Parser:
    return sub.add_parser(name, help=help, description=description or help, parents=[verbose_parent()],
                          formatter_class=HelpFormatter)


def byte_size(text: str) -> int:
    """``8GiB``, ``600MB``, ``1234``."""
    try:
        return parse_bytes(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def at_least(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if n < minimum or (maximum is not None and n > maximum):
            most = f" and at most {maximum}" if maximum is not None else ""
            raise argparse.ArgumentTypeError(f"must be at least {minimum}{most}, got {n}")
        return n
    parse.__name__ = f"integer >= {minimum}" + (f" and <= {maximum}" if maximum is not None else "")
    return parse


positive_int = at_least(1)


def depth(text: str) -> int | str:
    """``auto`` or a whole number >= 1 (``--prefetch``)."""
    return "auto" if text == "auto" else positive_int(text)


depth.__name__ = "'auto' or an integer >= 1"


def int_list(minimum: int) -> Callable[[str], list[int]]:
    """Comma-separated whole numbers, each at least ``minimum``: ``1,2,4``."""
    one = at_least(minimum)

    def parse(text: str) -> list[int]:
        parts = [x.strip() for x in text.split(",")]
        if not all(parts):
            raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated numbers such as 1,2,4")
        return [one(x) for x in parts]
    parse.__name__ = "comma-separated list"
    return parse


def choice_list(choices: tuple[str, ...]) -> Callable[[str], list[str]]:
    """Comma-separated names, each one of ``choices``."""
    def parse(text: str) -> list[str]:
        names = [x.strip() for x in text.split(",") if x.strip()]
        bad = [x for x in names if x not in choices]
        if bad or not names:
            raise argparse.ArgumentTypeError(f"{text!r}: choose comma-separated names from {', '.join(choices)}")
        return names
    parse.__name__ = "comma-separated list"
    return parse


def nonempty(text: str) -> str:
    if not text:
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def output_file(text: str) -> str:
    """A file to write at the end of a run: its folder must exist now, not after an hour of measuring."""
    folder = os.path.dirname(os.path.abspath(text)) or "."
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text} is a folder: pass a file name, e.g. {os.path.join(text, 'report.json')}")
    if not os.path.isdir(folder):
        raise argparse.ArgumentTypeError(f"folder {folder} does not exist: create it first (mkdir -p {folder})")
    if not os.access(folder, os.W_OK):
        raise argparse.ArgumentTypeError(f"folder {folder} is not writable")
    return text


def input_file(text: str) -> str:
    """A file to read: it must exist and be a readable file now, before anything is loaded."""
    if not os.path.exists(text):
        raise argparse.ArgumentTypeError(f"{text} does not exist")
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text} is a folder: pass a file")
    if not os.access(text, os.R_OK):
        raise argparse.ArgumentTypeError(f"{text} is not readable")
    return text


def device(text: str) -> str:
    """``cpu``, ``cuda`` or ``cuda:N``, refused at parse time when CUDA (or that GPU) is not there."""
    import torch
    name = text.strip().lower()
    if name == "cpu":
        return name
    if name != "cuda" and not (name.startswith("cuda:") and name[5:].isdigit()):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device: use cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text} asked for, but CUDA is not available here (torch "
                                         f"{torch.__version__}, no GPU or a CPU-only build): use --device cpu")
    index = int(name[5:]) if ":" in name else 0
    if index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text}: there are only {torch.cuda.device_count()} CUDA devices")
    return f"cuda:{index}"


def default_device() -> str:
    import torch
    return "cuda:0" if torch.cuda.is_available() else "cpu"


def require(module: str, extra: str | None, flag: str) -> None:
    """Refuse ``flag`` in one line (exit 2, before any work) when the optional ``module`` is not importable.

    ``extra`` names the ``pip install "offload[EXTRA]"`` extra that brings it (None: install ``module``)."""
    import importlib
    try:
        importlib.import_module(module)
    except ImportError as e:
        how = f'pip install "offload[{extra}]"' if extra else f"pip install {module.split('.')[0]}"
        raise UsageError(f"{flag} needs {module}, which cannot be imported here ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else module}): {how}") from None


def require_reader(reader: str | None) -> None:
    """``--reader native*`` needs the native extension: refused in one line when it is not built."""
    if reader and reader.startswith("native"):
        from .. import _native
        if _native.load_error() is not None:
            raise UsageError(f"--reader {reader}: {_native.load_error()}: reinstall offload with a C compiler "
                             f"present (pip install -e .), or pass --reader python")
        if reader == "native-uring" and not _native.uring_available():
            raise UsageError("--reader native-uring: io_uring is not available on this kernel: pass --reader native")


# Third-party loggers that speak when torchao is imported (transformers imports it to register its
# quantizers): "Failed to load <its CUDA extension>.so", "Detected no triton", and torch's pytree
# deprecation notes about torchao's enums. None of it concerns what a command does; offload's own
# logger ("offload") and Python warnings are left as they are.
THIRD_PARTY_NOISE = ("torchao", "torch.utils._pytree")


def quiet_third_party() -> None:
    """Silence THIRD_PARTY_NOISE below errors for this process (the CLI's; the library leaves them be)."""
    import logging
    for name in THIRD_PARTY_NOISE:
        logging.getLogger(name).setLevel(logging.ERROR)
