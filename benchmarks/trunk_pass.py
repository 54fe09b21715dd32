"""Milliseconds per image of the frozen trunk's pass, as the triplet script caches its features.

Builds the script's embedding (ResNet50, weights none), cuts it at `conv5_block1_out` as the
script does (`stores.split_at_layer`) and runs the trunk over batches of the script's size
with `stores.predict_rows`, the pass of JAX and PyTorch. `--rows` sets how many rows a
PyTorch model reads at once (`stores.torch_rows_at_once`); the peak memory is the process's,
so run it under `/usr/bin/time -v`:

    KERAS_BACKEND=torch /usr/bin/time -v python benchmarks/trunk_pass.py --rows 8

`--compare` also runs the batch in one call and prints the largest difference from the features
read in parts (it raises the peak to one call's).
"""

import argparse
import pathlib
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

import triplet_totally_looks_like as tutorial  # noqa: E402
from siamese_support import stores  # noqa: E402


def main(argv=None):
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=stores.torch_rows_at_once)
    parser.add_argument("--batches", type=int, default=4, help="timed batches (default 4)")
    parser.add_argument("--batch-size", type=int, default=tutorial.batch_size)
    parser.add_argument("--image-size", type=int, default=tutorial.target_shape[0])
    parser.add_argument("--compare", action="store_true", help="compare with one whole call")
    args = parser.parse_args(argv)
    stores.torch_rows_at_once = args.rows
    image_size = (args.image_size, args.image_size)
    embedding = tutorial.build_embedding_network(image_size, weights=None)
    trunk, _ = stores.split_at_layer(embedding, "resnet50", tutorial.first_trainable_layer)
    images = np.random.default_rng(0).uniform(0, 255, (args.batch_size, *image_size, 3))
    images = images.astype("float32")
    features = stores.predict_rows(trunk, images)  # untimed: the first pass builds and compiles
    seconds = []
    for _ in range(args.batches):
        started = time.perf_counter()
        stores.predict_rows(trunk, images)
        seconds.append(time.perf_counter() - started)
    per_image = statistics.median(seconds) / args.batch_size * 1000
    print(f"{per_image:.1f} ms an image (median of {args.batches} batches of {args.batch_size})")
    if args.compare:
        stores.torch_rows_at_once = args.batch_size
        whole = stores.predict_rows(trunk, images)
        difference = np.abs(features - whole).max()
        print(
            f"largest difference from one call: {difference:.3g} (largest value {whole.max():.3g})"
        )


if __name__ == "__main__":
    main()
