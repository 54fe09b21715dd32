"""Random, semi-hard and hard negatives, with and without --normalize, over several seeds.

    python tools/make_real_tll.py --pairs 300 /tmp/real300
    python benchmarks/mining_table.py --data-dir /tmp/real300 --output-root /tmp/mining

Trains `triplet_totally_looks_like.py` once per (negatives, normalisation, seed), each run
in its own folder under --output-root (a finished run is not trained again, so the command
can be stopped and started again), then prints the table of docs/results.md: triplet
accuracy and recall@1 after training, mean and standard deviation over the seeds, and the
mean difference from random negatives with the same normalisation and seeds.
"""

import argparse
import json
import pathlib
import statistics
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
NEGATIVES = ("random", "semi-hard", "hard")


def run_folder(output_root, negatives, normalize, seed):
    """Where one run of the grid goes."""
    name = f"{negatives}-{'normalized' if normalize else 'plain'}-seed{seed}"
    return pathlib.Path(output_root) / name


def train(data_dir, output_dir, negatives, normalize, seed, extra):
    """Run the script once (unless its folder holds a finished run)."""
    if (output_dir / "metrics.json").is_file():
        return
    command = [sys.executable, str(ROOT / "triplet_totally_looks_like.py")]
    command += ["--data-dir", str(data_dir), "--weights", "none", "--negatives", negatives]
    command += ["--seed", str(seed), "--output-dir", str(output_dir), "--overwrite", "--no-plots"]
    command += ["--normalize"] * normalize + extra
    print(" ".join(command[1:]), flush=True)
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)


def mean_and_spread(values):
    """'mean ± standard deviation' of `values`, to 3 decimals."""
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {spread:.3f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=pathlib.Path, required=True)
    parser.add_argument("--output-root", type=pathlib.Path, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--embeddings",
        choices=("both", "plain", "normalized"),
        default="both",
        help="the example's embeddings, --normalize's, or both (default)",
    )
    args = parser.parse_args()
    normalizations = {"both": (False, True), "plain": (False,), "normalized": (True,)}
    extra = ["--image-size", str(args.image_size), "--epochs", str(args.epochs)]
    extra += ["--batch-size", str(args.batch_size)]
    results = {}
    for normalize in normalizations[args.embeddings]:
        for negatives in NEGATIVES:
            for seed in args.seeds:
                output_dir = run_folder(args.output_root, negatives, normalize, seed)
                train(args.data_dir, output_dir, negatives, normalize, seed, extra)
                metrics = json.loads((output_dir / "metrics.json").read_text())
                results[negatives, normalize, seed] = metrics

    print("| embeddings | `--negatives` | triplet accuracy | vs random | recall@1 | vs random |")
    print("| --- | --- | --- | --- | --- | --- |")
    for normalize in normalizations[args.embeddings]:
        for negatives in NEGATIVES:
            row = ["normalised (margin 0.2)" if normalize else "plain (margin 0.5)"]
            row.append(f"`{negatives}`")
            for key in ("triplet_accuracy", "recall_at_1"):
                values = [results[negatives, normalize, seed][key] for seed in args.seeds]
                random = [results["random", normalize, seed][key] for seed in args.seeds]
                differences = [value - base for value, base in zip(values, random, strict=True)]
                row.append(mean_and_spread(values))
                row.append("" if negatives == "random" else f"{statistics.mean(differences):+.3f}")
            print("| " + " | ".join(row) + " |")
    for normalize in normalizations[args.embeddings]:
        before = [
            results["random", normalize, seed]["triplet_accuracy_before"] for seed in args.seeds
        ]
        kind = "normalised" if normalize else "plain"
        print(f"Before training ({kind}): triplet accuracy {mean_and_spread(before)}")


if __name__ == "__main__":
    main()
