"""Write a folder of generated image pairs in the Totally Looks Like layout.

    python tools/make_synthetic_tll.py --pairs 300 /tmp/tll300

makes /tmp/tll300/left/00000.jpg ... and /tmp/tll300/right/00000.jpg ..., one pair per
random scene, for offline training runs of triplet_totally_looks_like.py:

    python triplet_totally_looks_like.py --data-dir /tmp/tll300 --weights none
"""

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from siamese_support import synthetic  # noqa: E402


def main(argv=None):
    """Parse the command line and write the folder; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", type=pathlib.Path, help="folder to create (left/ and right/)")
    parser.add_argument("--pairs", type=int, default=300, help="number of pairs (default 300)")
    parser.add_argument(
        "--image-size", type=int, default=96, help="width and height in pixels (default 96)"
    )
    parser.add_argument(
        "--jitter",
        type=float,
        default=synthetic.synthetic_jitter,
        help="how much the two images of a pair differ "
        f"(default {synthetic.synthetic_jitter:g}; 0 draws the same image twice)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    args = parser.parse_args(argv)
    if (args.output / "left").exists() or (args.output / "right").exists():
        parser.error(f"{args.output} already holds left/ or right/; choose a new folder")
    try:
        synthetic.make_synthetic_dataset(
            args.output,
            pairs=args.pairs,
            image_size=args.image_size,
            seed=args.seed,
            jitter=args.jitter,
        )
    except (ValueError, OSError) as error:
        parser.error(str(error))
    print(f"{args.pairs} pairs in {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
