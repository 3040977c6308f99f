"""What a value of an option must be: the types that read durations and parameter counts, and
the checks each row of the options table (options.py) names, each returning why a value is
refused, or None. evaluate.py, predict.py and the average tool check their own numbers with
them too."""

import argparse
import math
import re


def duration(text):
    """Seconds of 90m, 2h, 1h30m, 600s, 1.5h."""
    units = {"h": 3600, "m": 60, "s": 1}
    parts = re.findall(r"(\d+(?:\.\d+)?)([hms])", text.strip().lower())
    if not parts or "".join(n + u for n, u in parts) != text.strip().lower():
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 90m, 2h, 1h30m, 600s)")
    return sum(float(n) * units[u] for n, u in parts)


def timeout(text):
    """Seconds of a duration (90m, 10m, 600s), or a plain number of seconds."""
    try:
        return float(text)
    except ValueError:
        return duration(text)


def rate(text):
    """A learning rate: a number, or auto (the LR range test's suggestion, twophase/lr_find.py)."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a learning rate: {text!r} (a number such as 5e-4, or auto: the range test's)"
        ) from None


def parameter_count(text):
    """100M, 25.6M, 1.5B or a plain number."""
    scale = {"K": 1e3, "M": 1e6, "B": 1e9}.get(text[-1:].upper(), 1)
    try:
        return int(float(text[:-1] if scale != 1 else text) * scale)
    except (ValueError, OverflowError):  # OverflowError: inf
        raise argparse.ArgumentTypeError(f"not a parameter count: {text!r} (e.g. 100M)") from None


# ----------------------------------------------------------------------------- what a value must be

# The smallest side an image becomes: the steps of the progressive and test sizes are 8 px at the
# least (schedule.size_step), and below it a ResNet's last stage sees nothing (32 px is usual).
MIN_SIDE = 8


def at_least(low, what="must be {low} or more"):
    def check(value):
        return None if value >= low else what.format(low=low)

    return check


def above(low, what="must be more than {low}"):
    def check(value):
        return None if value > low else what.format(low=low)

    return check


def between(low, high, what="must be between {low} and {high}"):
    def check(value):
        return None if low <= value <= high else what.format(low=low, high=high)

    return check


def half_open(low, high, what="must be {low} or more and less than {high}"):
    def check(value):
        return None if low <= value < high else what.format(low=low, high=high)

    return check


PROBABILITY = between(0, 1, "a probability, between 0 and 1")


def learning_rate(value):
    if value == "auto" or value > 0:
        return None
    return "a learning rate must be more than 0 (or auto: the LR range test's suggestion)"


def share(value):
    return None if 0 < value <= 1 else "a share in (0, 1]"


def held_out(value):
    if 0 < value < 1:
        return None
    return (
        "the share of each class held out to validate on must be more than 0 and less than 1 "
        "(e.g. 0.1): every run validates, and a val/ folder (or --val-labels) holds validation "
        "images of its own"
    )


def decay(value):
    if not 0 < value < 1:
        return "the decay must be between 0 and 1, e.g. 0.999"
    return None


def alpha(value):
    return "alpha must be positive (0 turns it off)" if value < 0 else None


def factor(value):
    return None if 0 < value <= 1 else "the factor must be in (0, 1] (1 turns it off)"


def epochs_to_average(value):
    if value == 0 or value >= 2:
        return None
    return "0 (off), or 2 or more: an average needs two epochs"


def each_positive(values):
    return None if all(v > 0 for v in values) else "each must be more than 0 (it divides)"


def low_high(values):
    low, high = values
    if 0 < low <= high:
        return None
    return "the first must be more than 0, the second as much or more: a range, low then high"


def checked(kind, check):
    """An argparse type for the scripts' own parsers: `kind` of the text, refused with `check`'s
    sentence (--batch-size 0: must be 1 or more)."""

    def value_of(text):
        value = kind(text)
        why = check(value)
        if why:
            raise argparse.ArgumentTypeError(f"{text}: {why}")
        return value

    value_of.__name__ = kind.__name__  # argparse's "invalid int value" names it
    return value_of


def finite(value):
    """Whether a value holds no nan or inf (float() reads them: argparse lets them through)."""
    values = value if isinstance(value, list) else [value]
    return all(math.isfinite(v) for v in values if isinstance(v, float))
