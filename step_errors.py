"""How a step fails: one sentence that says what to do next, the tail of the failed thing's log, exit code 1.

Shared by every step script and by the local stand-ins (stand_ins/), for Azure and local failures alike.
"""

import sys

LOG_TAIL_LINES = 30


class StepError(RuntimeError):
    """A step's failure (Azure or local) explained in one sentence; the step exits non-zero with it."""


def exit_with(error):
    """Print a step's error the same way everywhere; returns the exit code."""
    print(f"error: {error}", file=sys.stderr)
    return 1


def print_tail(lines, title):
    """Print the last LOG_TAIL_LINES of a log to stderr."""
    print(f"--- last {LOG_TAIL_LINES} lines of {title} ---", file=sys.stderr)
    for line in list(lines)[-LOG_TAIL_LINES:]:
        print(line, file=sys.stderr)
