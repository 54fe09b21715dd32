"""Write a folder of real-image pairs (MNIST digits) in the Totally Looks Like layout.

    python tools/make_real_tll.py --pairs 300 /tmp/real300

makes /tmp/real300/left/00000.png ... and /tmp/real300/right/00000.png ...: each pair is a
four-digit number, its four digits drawn in a 2 x 2 grid from different handwritten MNIST
images on each side (from data/mnist-tiny.npz; no image is used twice). The folder also
holds numbers.csv and README.txt (source and licence: MNIST's CC BY-SA 3.0). For offline
training runs of triplet_totally_looks_like.py on real images:

    python triplet_totally_looks_like.py --data-dir /tmp/real300 --weights none
"""

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from siamese_support import real_pairs  # noqa: E402


def main(argv=None):
    """Parse the command line and write the folder; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", type=pathlib.Path, help="folder to create (left/ and right/)")
    parser.add_argument("--pairs", type=int, default=300, help="number of pairs (default 300)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--source",
        type=pathlib.Path,
        default=real_pairs.DEFAULT_SOURCE,
        help="a mnist.npz-style file (default: data/mnist-tiny.npz of this repository)",
    )
    args = parser.parse_args(argv)
    if (args.output / "left").exists() or (args.output / "right").exists():
        parser.error(f"{args.output} already holds left/ or right/; choose a new folder")
    try:
        real_pairs.make_real_dataset(args.output, args.pairs, args.seed, args.source)
    except (ValueError, OSError, KeyError) as error:
        parser.error(str(error))
    print(f"{args.pairs} pairs in {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
