"""Time `triplet_totally_looks_like.py search`: a first search, a repeated one, and start-up.

    python benchmarks/search_time.py --runs 3 /tmp/search_bench

makes, in the folder given, a gallery of 1,000 generated images of 64 x 64 (500 pairs,
`tools/make_synthetic_tll.py`) and a dry run's model (64 x 64), unless they are there, then
measures three commands with `/usr/bin/time -v` (`timed.py`), each `--runs` times:

- the first search of the gallery, which embeds it (its cache removed before each run);
- a repeated search, which reads the gallery's embeddings from the cache;
- `compare QUERY QUERY`, which pays what every command of the script pays (Python, the
  TensorFlow and Keras imports, loading the model, embedding one image): the start-up.

Prints each run's wall time and peak memory, then the medians.
"""

import argparse
import pathlib
import shutil
import statistics
import subprocess
import sys

from timed import measure

REPOSITORY = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = str(REPOSITORY / "triplet_totally_looks_like.py")


def main(argv=None):
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=pathlib.Path, help="where the gallery and model go")
    parser.add_argument("--runs", type=int, default=3, help="runs per command (default 3)")
    args = parser.parse_args(argv)
    gallery, run_dir = args.folder / "gallery", args.folder / "run"
    if not gallery.exists():
        tool = REPOSITORY / "tools" / "make_synthetic_tll.py"
        command = [sys.executable, str(tool), "--pairs", "500", "--image-size", "64"]
        subprocess.run([*command, str(gallery)], check=True)
    if not (run_dir / "metrics.json").exists():
        command = [sys.executable, SCRIPT, "--dry-run", "--no-plots", "--overwrite"]
        subprocess.run([*command, "--output-dir", str(run_dir)], check=True)
    query = str(gallery / "left" / "00000.jpg")
    search = [sys.executable, SCRIPT, "search", query, "--gallery", str(gallery)]
    search += ["--run-dir", str(run_dir)]
    commands = {
        "first search (embeds the gallery)": search,
        "repeated search (gallery from the cache)": search,
        "compare QUERY QUERY (start-up)": [
            *[sys.executable, SCRIPT, "compare", query, query, "--run-dir", str(run_dir)]
        ],
    }
    medians = {}
    for name, command in commands.items():
        results = []
        for _ in range(args.runs):
            if name.startswith("first"):
                shutil.rmtree(run_dir / "gallery-cache", ignore_errors=True)
            seconds, megabytes, stdout = measure(command)
            gallery_line = next((x for x in stdout.splitlines() if x.startswith("Gallery")), "")
            print(f"{name}: {seconds:.2f} s, {megabytes:,.0f} MB  {gallery_line}", flush=True)
            results.append((seconds, megabytes))
        medians[name] = [statistics.median(values) for values in zip(*results, strict=True)]
    for name, (seconds, megabytes) in medians.items():
        print(f"median {name}: {seconds:.2f} s, {megabytes:,.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
