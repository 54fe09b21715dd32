"""Run the triplet script from initial weights kept in a file, to compare backends from one start.

Each backend draws its own initial weights, so two backends' runs differ from their first
step. This runs `triplet_totally_looks_like.py` with the arguments given after `--`, but
loads the embedding model's initial weights from `--weights-file` (after saving there the
weights it draws, when the file does not exist yet). Under JAX and PyTorch the same `--seed`
also gives the same triplets in the same order; `--print-steps` prints every training step's
loss, to see where two runs part:

    python benchmarks/same_start.py --weights-file /tmp/start.weights.h5 -- \\
        --data-dir /tmp/real300 --weights none --image-size 64 --epochs 10 --batch-size 16 \\
        --output-dir /tmp/same_tensorflow
    KERAS_BACKEND=jax python benchmarks/same_start.py --weights-file /tmp/start.weights.h5 -- \\
        --data-dir /tmp/real300 --weights none --image-size 64 --epochs 10 --batch-size 16 \\
        --output-dir /tmp/same_jax
"""

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import triplet_totally_looks_like as tutorial  # noqa: E402
from triplet_totally_looks_like import keras  # noqa: E402


class StepLosses(keras.callbacks.Callback):
    """Prints each training step's own loss (Keras logs the epoch's running mean)."""

    def on_epoch_begin(self, epoch, logs=None):
        self.running_mean = 0.0

    def on_train_batch_end(self, batch, logs=None):
        steps, mean = batch + 1, float(logs["loss"])
        print(f"step {batch + 1}: loss {steps * mean - batch * self.running_mean:.6f}", flush=True)
        self.running_mean = mean


def main(argv=None):
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights-file", type=pathlib.Path, required=True)
    parser.add_argument("--print-steps", action="store_true")
    parser.add_argument("script_arguments", nargs=argparse.REMAINDER, help="-- then its options")
    args = parser.parse_args(argv)
    script_arguments = args.script_arguments
    if script_arguments[:1] == ["--"]:
        script_arguments = script_arguments[1:]
    if not args.weights_file.name.endswith(".weights.h5"):
        parser.error("--weights-file must end in .weights.h5, as Keras requires")
    build_embedding_network, train = tutorial.build_embedding_network, tutorial.train

    def build_from_file(*build_arguments, **build_options):
        embedding = build_embedding_network(*build_arguments, **build_options)
        if args.weights_file.exists():
            embedding.load_weights(args.weights_file)
            print(f"Initial weights from {args.weights_file}")
        else:
            embedding.save_weights(args.weights_file)
            print(f"Initial weights saved in {args.weights_file}")
        return embedding

    def train_printing_steps(*train_arguments):
        *others, callbacks = train_arguments
        return train(*others, [*callbacks, StepLosses()])

    tutorial.build_embedding_network = build_from_file
    if args.print_steps:
        tutorial.train = train_printing_steps
    return tutorial.main(script_arguments)


if __name__ == "__main__":
    sys.exit(main())
