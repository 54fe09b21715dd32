"""A run's epochs after the first against the compiled steps that `epoch_split.py` timed.

Reads the run's `metrics.json` (`epoch_seconds`, what the script itself measured) and the
output of `benchmarks/epoch_split.py` for the same command (its line "expected epoch from
the benchmark step: S s"), and prints the median epoch after the first, the expected epoch
and their ratio: 1.0 means no time spent outside the compiled steps.

    python benchmarks/epoch_ratio.py RUN_DIR/metrics.json split.log
"""

import json
import re
import statistics
import sys


def epoch_ratio(metrics_path, split_log_path):
    """`(median epoch after the first, expected epoch, ratio)`, in seconds."""
    with open(metrics_path) as stream:
        epochs = json.load(stream)["epoch_seconds"]
    if len(epochs) < 2:
        raise ValueError(f"{metrics_path} has {len(epochs)} epoch: run two or more")
    with open(split_log_path) as stream:
        found = re.search(r"expected epoch from the benchmark step: ([\d.]+) s", stream.read())
    if found is None:
        raise ValueError(f"{split_log_path} has no expected epoch (a finished epoch_split.py?)")
    after_first = statistics.median(epochs[1:])
    expected = float(found[1])
    return after_first, expected, after_first / expected


def main(argv=None):
    """Command-line entry point."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python benchmarks/epoch_ratio.py METRICS_JSON SPLIT_LOG", file=sys.stderr)
        return 2
    try:
        after_first, expected, ratio = epoch_ratio(*argv)
    except (OSError, ValueError, KeyError) as error:
        print(f"epoch_ratio.py: error: {error}", file=sys.stderr)
        return 2
    print(
        f"epoch after the first (median): {after_first:.3f} s; the benchmark's steps: "
        f"{expected:.3f} s; ratio {ratio:.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
