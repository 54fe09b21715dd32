"""Milliseconds of one 3 x 3 convolution under JAX, by the size of its feature map.

ResNet50's last stage (`conv5_block2`, `conv5_block3`, the layers the triplet script trains)
convolves 512 channels with 3 x 3 kernels on a map of (image side / 32) pixels square: 2 x 2
at the 64 x 64 images of the README's 300-pair run, 3 x 3 at 96 x 96, 7 x 7 at 200 x 200.
This times that convolution alone, forward, compiled by XLA for the default device, on a
batch of 48 maps (16 triplets), the median of `--repeats` calls after one untimed call.

    KERAS_BACKEND=jax python benchmarks/xla_conv_cpu.py
"""

import argparse
import statistics
import sys
import time

import jax
import numpy as np
from jax import lax


def convolution_milliseconds(side, batch=48, channels=512, repeats=5):
    """Median milliseconds of a compiled 3 x 3 SAME convolution on `batch` maps `side` square."""
    rng = np.random.default_rng(0)
    maps = jax.numpy.asarray(rng.random((batch, side, side, channels), np.float32))
    kernel = jax.numpy.asarray(rng.random((3, 3, channels, channels), np.float32))
    numbers = ("NHWC", "HWIO", "NHWC")
    convolve = jax.jit(
        lambda x, w: lax.conv_general_dilated(x, w, (1, 1), "SAME", None, None, numbers)
    )
    convolve(maps, kernel).block_until_ready()
    durations = []
    for _ in range(repeats):
        started = time.perf_counter()
        convolve(maps, kernel).block_until_ready()
        durations.append(time.perf_counter() - started)
    return 1000 * statistics.median(durations)


def main(argv=None):
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sides", type=int, nargs="+", default=[2, 3, 4, 7])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    print(f"jax {jax.__version__}, device {jax.devices()[0].platform}")
    for side in args.sides:
        milliseconds = convolution_milliseconds(side, repeats=args.repeats)
        gigaflops = 2 * 48 * side * side * 9 * 512 * 512 / milliseconds / 1e6
        print(f"{side} x {side} maps: {milliseconds:8.1f} ms ({gigaflops:6.1f} GFLOP/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
