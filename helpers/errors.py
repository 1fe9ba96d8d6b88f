"""One way to fail: helpers raise StepError; each step's main() turns it into one sentence and an exit code.

    try:
        ...
    except StepError as error:       # config.MissingSettingsError is one too
        return exit_code(error)      # prints "error: <sentence>" to stderr, returns 1

The sentence says what to do next (the command to run, the setting to change). A failed job or deployment
also gets the tail of its log (print_tail). Exit codes: 0 done, 1 failed (StepError), 130 stopped with Ctrl+C
(what was started goes on or is recorded, as the step says).
"""

import sys

LOG_TAIL_LINES = 30


class StepError(RuntimeError):
    """A step's failure (Azure or local) explained in one sentence; the step exits non-zero with it."""


def exit_code(error):
    """Print a step's error the same way everywhere; returns the exit code the step ends with."""
    print(f"error: {error}", file=sys.stderr)
    return 1


def print_tail(lines, title):
    """Print the last LOG_TAIL_LINES of a log to stderr."""
    print(f"--- last {LOG_TAIL_LINES} lines of {title} ---", file=sys.stderr)
    for line in list(lines)[-LOG_TAIL_LINES:]:
        print(line, file=sys.stderr)
