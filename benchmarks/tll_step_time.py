"""Seconds per training step of the triplet model, as triplet_totally_looks_like.py trains it.

Builds the script's Siamese model at 200 x 200 with ResNet50 weights `none`, compiles it as
the script does (Adam, 0.0001) and times `fit()` steps on one fixed batch of random
images of 32 triplets, after warm-up steps, on whatever device TensorFlow picks.

    python benchmarks/tll_step_time.py --steps 5
"""

import argparse
import pathlib
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
import triplet_totally_looks_like as tll  # noqa: E402


class _BatchTimer(tll.keras.callbacks.Callback):
    """Wall time of each training batch."""

    def on_train_begin(self, logs=None):
        self.durations = []

    def on_train_batch_begin(self, batch, logs=None):
        self._start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.durations.append(time.perf_counter() - self._start)


def step_times(steps, warmup, image_size, batch_size):
    """Build and compile the model; return the wall time of each timed training step."""
    tll.keras.utils.set_random_seed(0)
    embedding = tll.build_embedding_network((image_size, image_size), weights=None)
    siamese_network = tll.build_siamese_network(embedding, (image_size, image_size))
    siamese_model = tll.SiameseModel(siamese_network)
    siamese_model.compile(optimizer=tll.keras.optimizers.Adam(tll.learning_rate))
    rng = np.random.default_rng(0)
    shape = (batch_size, image_size, image_size, 3)
    batch = tuple(rng.uniform(0, 255, shape).astype("float32") for _ in range(3))
    # fit() on a repeated batch runs the script's own train_step, as in training.
    dataset = tll.tf.data.Dataset.from_tensors(batch).repeat()
    timer = _BatchTimer()
    siamese_model.fit(
        dataset, steps_per_epoch=warmup + steps, epochs=1, callbacks=[timer], verbose=0
    )
    durations = timer.durations[warmup:]
    return durations


def main(argv=None):
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="timed steps (default 5)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps (default 2)")
    parser.add_argument("--image-size", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args(argv)
    durations = step_times(args.steps, args.warmup, args.image_size, args.batch_size)
    print("steps:", " ".join(f"{seconds:.2f}" for seconds in durations))
    print(f"seconds_per_step {statistics.median(durations):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
