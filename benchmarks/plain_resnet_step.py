"""Seconds per training step of a plain Keras ResNet50 model: the bar for the triplet step.

The same network as the triplet script's embedding (ResNet50 without its top, frozen before
`conv5_block1_out`, Flatten, Dense(512) + BatchNorm, Dense(256) + BatchNorm, Dense(256)),
trained with Keras's own step (`train_on_batch`, Adam 0.0001, a mean squared error to random
targets) on as many inputs as one triplet step embeds: 3 x 32 = 96 by default. With
`--cache-features` (the triplet script's default) it trains the part after the cut on the
frozen trunk's outputs, as the script does; without, the whole network on images. Whatever
the triplet step adds to this work (three calls to the embedding, the distances, the loss,
its own step under TensorFlow) shows as the difference to `tll_step_time.py`. Runs on any
Keras backend (`KERAS_BACKEND`).

    python benchmarks/plain_resnet_step.py --steps 5
    KERAS_BACKEND=jax python benchmarks/plain_resnet_step.py --steps 5
"""

import argparse
import statistics
import time

import keras
import numpy as np
from keras import layers
from keras.applications import resnet

FIRST_TRAINABLE_LAYER = "conv5_block1_out"  # as in triplet_totally_looks_like.py


def plain_model(image_size, cache_features):
    """The embedding network (see the module's docstring), or its part after the cut."""
    base = resnet.ResNet50(weights=None, include_top=False, input_shape=(*image_size, 3))
    trainable = False
    for layer in base.layers:
        trainable = trainable or layer.name == FIRST_TRAINABLE_LAYER
        layer.trainable = trainable
    if cache_features:
        cut = base.get_layer(FIRST_TRAINABLE_LAYER).output
        base = keras.Model(cut, base.output)
    inputs = keras.Input(shape=base.input.shape[1:])
    x = layers.Flatten()(base(inputs))
    x = layers.BatchNormalization()(layers.Dense(512, activation="relu")(x))
    x = layers.BatchNormalization()(layers.Dense(256, activation="relu")(x))
    return keras.Model(inputs, layers.Dense(256)(x))


def main(argv=None):
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="timed steps (default 5)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps (default 2)")
    parser.add_argument("--image-size", type=int, default=200)
    parser.add_argument("--inputs", type=int, default=96, help="inputs a step (default 3 x 32)")
    parser.add_argument("--cache-features", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args(argv)
    keras.utils.set_random_seed(0)
    model = plain_model((args.image_size, args.image_size), args.cache_features)
    model.compile(keras.optimizers.Adam(0.0001), loss="mse")
    rng = np.random.default_rng(0)
    inputs = rng.uniform(0, 1, (args.inputs, *model.input.shape[1:])).astype("float32")
    targets = rng.normal(size=(args.inputs, 256)).astype("float32")
    durations = []
    for step in range(args.warmup + args.steps):
        started = time.perf_counter()
        model.train_on_batch(inputs, targets)
        if step >= args.warmup:
            durations.append(time.perf_counter() - started)
    print(f"backend {keras.backend.backend()} cache_features {args.cache_features}")
    print("steps:", " ".join(f"{seconds:.3f}" for seconds in durations))
    print(f"seconds_per_step {statistics.median(durations):.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
