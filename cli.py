"""
What the command-line scripts share: the two errors they turn into exit statuses, argparse's value types, a parser
that reports a bad flag in one line, and exit_status, which makes every failure one line on stderr.

    UsageError     a flag, checkpoint, picture or dataset we cannot use      exit 2
    TrainingError  the run cannot go on (NaN loss, out of memory)            exit 1
"""

import argparse
import dataclasses
import math
import os
import sys
import textwrap
import traceback

import torch


class UsageError(Exception):
    """A flag, checkpoint or dataset we cannot use: exit status 2."""


class TrainingError(Exception):
    """The run cannot go on (NaN loss, out of memory): exit status 1."""


def int_at_least(lo):
    def parse(s):
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {s!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {v}")
        return v
    return parse


def float_in(lo, hi=math.inf, *, lo_open=False, hi_open=False):
    def parse(s):
        try:
            v = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None
        too_low = v <= lo if lo_open else v < lo
        too_high = v >= hi if hi_open else v > hi
        if not math.isfinite(v) or too_low or too_high:
            raise argparse.ArgumentTypeError(
                f"must be in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}, got {s}")
        return v
    return parse


def device_name(s):
    if s == "auto":
        return s
    try:
        torch.device(s)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"not a torch device: {s!r} (try auto, cpu, cuda, cuda:1, mps)") from None
    return s


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # a help that states its own default keeps its wording
        return action.help if "(default:" in action.help else super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    def error(self, message):
        # argparse would print the whole usage block first; one line is easier to read (and to grep)
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def add_config_flags(group, config_cls, *, every_field=False):
    """A flag for each field of a model config that has a help line (the dataclass is the one place that holds a
    model's defaults and their meaning), or for every field: --d-model for d_model, typed by the field (ints >= 1,
    floats are rates in [0, 1), `int | None` an integer >= 0), --no-... for booleans."""
    for f in dataclasses.fields(config_cls):
        if "help" not in f.metadata and not every_field:
            continue  # set from the data (in_chans, img_size, ...) or not worth a flag (chunk_size, ...)
        flag = "--" + f.name.replace("_", "-")
        kwargs = dict(default=f.default, help=f.metadata.get("help", "fixed in train.py (set from the data, or by "
                                                                 "design)"))
        if f.type is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        elif "choices" in f.metadata:
            group.add_argument(flag, choices=f.metadata["choices"], type=int if f.type is int else str, **kwargs)
        else:
            kind = {int: int_at_least(1), float: float_in(0, 1, hi_open=True)}.get(f.type, int_at_least(0))
            group.add_argument(flag, type=kind, metavar="RATE" if f.type is float else "N", **kwargs)


def given_flags(parser, argv):
    """The flags on the command line, as dests (argparse fills in defaults only for attributes not yet set)."""
    unset = object()
    namespace = argparse.Namespace(**dict.fromkeys(vars(parser.parse_args([])), unset))
    return {key for key, value in vars(parser.parse_args(argv, namespace)).items() if value is not unset}


def resolve_device(name):
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: no CUDA GPU is available (use --device auto or cpu)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {name}: MPS is not available (use --device auto or cpu)")
    return device



def shorten(e):
    """An exception as at most 300 characters of one line."""
    return textwrap.shorten(str(e), 300) or type(e).__name__


class ReaderMayLeave:
    """sys.stdout for `python test_model.py | head`: once the reader has closed the pipe, what is printed after is
    dropped, and the run goes on to write its files (Python would raise BrokenPipeError at the next print, losing
    the rest of the run, and print another at exit)."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text):
        try:
            return self.stream.write(text)
        except BrokenPipeError:
            self.reader_left()
            return len(text)

    def flush(self):
        try:
            self.stream.flush()
        except BrokenPipeError:
            self.reader_left()

    def reader_left(self):
        os.dup2(os.open(os.devnull, os.O_WRONLY), self.stream.fileno())  # the buffered rest goes nowhere, quietly

    def __getattr__(self, name):  # isatty, fileno, encoding, ...
        return getattr(self.stream, name)


def exit_status(run, who=""):
    """run()'s exit status, every error turned into one line on stderr: no traceback, nothing lost."""
    def fail(message, status):
        print(f"error{who}: {' '.join(str(message).split())}", file=sys.stderr)  # one line, however long
        return status
    sys.stdout = ReaderMayLeave(sys.stdout)
    try:
        status = run()
        sys.stdout.flush()
        return status
    except UsageError as e:
        return fail(e, 2)
    except TrainingError as e:
        return fail(e, 1)
    except KeyboardInterrupt:  # a second Ctrl-C, or one before training began: checkpoints are whole anyway
        return fail("interrupted", 130)
    except Exception as e:  # a bug: still one line, with where it happened
        frame = traceback.extract_tb(e.__traceback__)[-1]
        return fail(f"{type(e).__name__} at {os.path.basename(frame.filename)}:{frame.lineno}: {e}", 1)
    finally:
        sys.stdout = sys.stdout.stream
