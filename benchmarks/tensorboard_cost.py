"""Run a script without its TensorBoard callback, or with the callback's own time measured.

    python benchmarks/tensorboard_cost.py none mnist_siamese.py --epochs 5 ...
    python benchmarks/tensorboard_cost.py logs triplet_totally_looks_like.py --dry-run ...

`none` removes the callback from `run_folder.training_callbacks`; `logs` keeps it and, once
the script ends, prints the seconds spent inside its methods and their share of the epochs'
time (`EpochTimer`). Under `/usr/bin/time` (or `benchmarks/timed.py`), alternating the two,
this gives the whole-process cost of the logs too.
"""

import functools
import pathlib
import runpy
import sys
import time

REPOSITORY = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPOSITORY))
from siamese_support import run_folder  # noqa: E402


def main(argv):
    """Command-line entry point: `VARIANT SCRIPT ARGS...`."""
    if len(argv) < 2 or argv[0] not in ("none", "logs"):
        print(__doc__, file=sys.stderr)
        return 2
    variant, script, *args = argv
    spent = {}
    found = {}
    original = run_folder.training_callbacks

    def timed(name, method):
        @functools.wraps(method)
        def wrapper(*positional, **keywords):
            start = time.perf_counter()
            try:
                return method(*positional, **keywords)
            finally:
                spent[name] = spent.get(name, 0.0) + time.perf_counter() - start

        return wrapper

    def training_callbacks(*positional, **keywords):
        callbacks = original(*positional, **keywords)
        found["timer"] = callbacks[-1]
        if variant == "none":
            return [c for c in callbacks if not isinstance(c, run_folder.TensorBoardLogs)]
        for callback in callbacks:
            if isinstance(callback, run_folder.TensorBoardLogs):
                for name in dir(callback):
                    if name.startswith("on_") or name == "set_model":
                        setattr(callback, name, timed(name, getattr(callback, name)))
        return callbacks

    run_folder.training_callbacks = training_callbacks
    sys.argv = [script, *args]
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as exit:
        if exit.code:
            raise
    if variant == "logs" and "timer" in found:
        durations = found["timer"].durations
        total = sum(spent.values())
        share = 100 * total / sum(durations) if durations else float("nan")
        epochs = ", ".join(f"{duration:.3f}" for duration in durations)
        print(f"TensorBoard callback: {total:.4f} s over {len(durations)} epochs ({epochs} s)")
        print(f"TensorBoard callback share of the epochs' time: {share:.2f} %")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
