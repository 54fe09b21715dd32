"""Seconds per training step of the triplet model, as triplet_totally_looks_like.py trains it.

Builds the script's Siamese model at 200 x 200 with ResNet50 weights `none`, compiles it as
the script does (Adam, 0.0001) and times `fit()` steps on one fixed batch of 32 random
triplets, after warm-up steps. The configuration is the script's default on this machine
(with `--cache-features`: the frozen trunk runs once on the batch, outside the timed steps,
and the steps train the tail on its features); the flags select the others. The losses of
the steps are printed too: every configuration must give the same ones.

    python benchmarks/tll_step_time.py --steps 5
    python benchmarks/tll_step_time.py --steps 5 --no-cache-features
    KERAS_BACKEND=jax python benchmarks/tll_step_time.py --steps 5   # any Keras backend
"""

import argparse
import itertools
import pathlib
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
import triplet_totally_looks_like as tll  # noqa: E402
from siamese_support import devices, stores  # noqa: E402


class _BatchTimer(tll.keras.callbacks.Callback):
    """Wall time and loss of each training batch."""

    def on_train_begin(self, logs=None):
        self.durations = []
        self.losses = []

    def on_train_batch_begin(self, batch, logs=None):
        self._start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.durations.append(time.perf_counter() - self._start)
        self.losses.append(float(logs["loss"]))


def step_times(args):
    """Build and compile the model; return the timer of the training steps and the setup time."""
    if args.mixed_precision:
        tll.keras.mixed_precision.set_global_policy("mixed_float16")
    tll.keras.utils.set_random_seed(0)
    image_size = (args.image_size, args.image_size)
    embedding = tll.build_embedding_network(image_size, weights=None)
    rng = np.random.default_rng(0)
    shape = (args.batch_size, *image_size, 3)
    batch = tuple(rng.uniform(0, 255, shape).astype("float32") for _ in range(3))
    network = embedding
    started = time.perf_counter()
    if args.cache_features:
        trunk, network = stores.split_at_layer(embedding, "resnet50", tll.first_trainable_layer)
        batch = tuple(tll.ops.convert_to_numpy(trunk(images, training=False)) for images in batch)
    setup_seconds = time.perf_counter() - started
    siamese_model = tll.SiameseModel(tll.build_siamese_network(network))
    siamese_model.compile(
        optimizer=tll.keras.optimizers.Adam(tll.learning_rate),
        jit_compile="auto" if args.jit_compile is None else args.jit_compile,
    )
    # fit() on a repeated batch runs the script's own training step (TensorFlow's tape step,
    # or Keras's own under JAX and PyTorch), as in training; the triplet is the batch's one
    # element, as the script's pipeline gives it. TensorFlow takes it as a tensor already;
    # the other backends from a generator (each step copies it in).
    if devices.keras_backend() == "tensorflow":
        dataset = tll.tf.data.Dataset.from_tensors((batch,)).repeat()
    else:
        dataset = (batch for batch in itertools.repeat((batch,)))
    timer = _BatchTimer()
    steps = args.warmup + args.steps
    siamese_model.fit(
        dataset, steps_per_epoch=steps, epochs=1, callbacks=[timer], verbose=0, shuffle=False
    )
    return timer, setup_seconds


def main(argv=None):
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="timed steps (default 5)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps (default 2)")
    parser.add_argument("--image-size", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--cache-features", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--mixed-precision", action=argparse.BooleanOptionalAction)
    parser.add_argument("--jit-compile", action=argparse.BooleanOptionalAction)
    args = parser.parse_args(argv)
    if args.mixed_precision is None:  # the script's default: on with a GPU
        args.mixed_precision = devices.accelerator_visible()
    timer, setup_seconds = step_times(args)
    print(
        f"backend {devices.keras_backend()} cache_features {args.cache_features} "
        f"mixed_precision {args.mixed_precision} "
        f"jit_compile {args.jit_compile}"
    )
    if args.cache_features:
        print(
            f"seconds_trunk_features {setup_seconds:.3f} "
            f"(once, for the 3 x {args.batch_size} images)"
        )
    # Keras logs the running mean of the epoch's losses; each step's own loss follows from it.
    means = np.array(timer.losses)
    losses = means * np.arange(1, len(means) + 1) - np.concatenate(
        [[0.0], means[:-1] * np.arange(1, len(means))]
    )
    print("losses:", " ".join(f"{loss:.5f}" for loss in losses))
    durations = timer.durations[args.warmup :]
    print("steps:", " ".join(f"{seconds:.3f}" for seconds in durations))
    print(f"seconds_per_step {statistics.median(durations):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
