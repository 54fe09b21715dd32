"""Triplets per second of triplet_totally_looks_like.py's input pipelines alone (no model).

Writes generated JPEG pairs (250 x 250, about the size of the dataset's images) to a
temporary folder and measures, at 200 x 200 and batch 32:

- `example`: the example's pipeline, which decodes and resizes three files per triplet;
- `decoded_once`: the images decoded and resized once into a store (`--no-cache-features`),
  then gathered by index; the one-off decoding time is printed too;
- `features`: rows of a store of conv5_block1_out features (7 x 7 x 2048 float32, the
  default `--cache-features`), gathered by index.

    python benchmarks/tll_pipeline.py --pairs 300 --batches 40
"""

import argparse
import functools
import pathlib
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
import triplet_totally_looks_like as tll  # noqa: E402
from siamese_support import image_folders, stores, synthetic  # noqa: E402


def main(argv=None):
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=300, help="generated pairs (default 300)")
    parser.add_argument("--batches", type=int, default=40, help="timed batches (default 40)")
    parser.add_argument("--batch-size", type=int, default=tll.batch_size)
    args = parser.parse_args(argv)
    image_size = tll.target_shape
    with tempfile.TemporaryDirectory() as folder:
        synthetic.make_synthetic_dataset(folder, pairs=args.pairs, image_size=250, seed=0)
        anchors, positives = image_folders.find_image_pairs(folder)
        load_image = functools.partial(tll.preprocess_image, image_size=image_size)

        example = tll.make_dataset(
            tll.training_triplets(anchors, positives).repeat(), image_size, args.batch_size
        )
        print(f"example {stores.pipeline_throughput(example, args.batches):.0f} triplets/s")

        started = time.perf_counter()
        images = stores.decode_images_once(
            anchors + positives, load_image, image_size, tll.batch_size
        )
        seconds = time.perf_counter() - started
        print(f"decoding {len(images)} images once: {seconds:.2f} s")
        indices = tll.training_triplet_indices(len(anchors)).repeat()
        decoded_once = stores.make_store_dataset(images, indices, args.batch_size)
        print(
            f"decoded_once {stores.pipeline_throughput(decoded_once, args.batches):.0f} triplets/s"
        )

        features = np.random.default_rng(0).random((len(images), 7, 7, 2048), np.float32)
        feature_batches = stores.make_store_dataset(features, indices, args.batch_size)
        print(
            f"features {stores.pipeline_throughput(feature_batches, args.batches):.0f} triplets/s"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
