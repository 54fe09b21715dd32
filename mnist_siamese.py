"""Siamese MLP trained with a contrastive loss on pairs of MNIST digits (Keras 3).

A port of the classic Keras example `examples/mnist_siamese.py`, after Hadsell, Chopra &
LeCun (2006), "Dimensionality Reduction by Learning an Invariant Mapping". Two copies of one
embedding network read a pair of digits; the Euclidean distance between their embeddings is
trained to be small for two images of the same digit and at least `margin` for different
digits. The original reports 97.2 % test-pair accuracy after 20 epochs.

Definitions in the original's order, then `main()` runs its steps. What the port adds
(checked data, evaluation, plots, a resumable run folder, devices) is in `siamese_support`.

    python mnist_siamese.py                      # the example: download MNIST, 20 epochs
    python mnist_siamese.py --data mnist.npz     # a local copy of Keras's mnist.npz
    python mnist_siamese.py --dry-run            # 1 epoch on the small subset in data/
    KERAS_BACKEND=jax python mnist_siamese.py    # JAX or PyTorch, without TensorFlow
"""

import pathlib
import sys

from siamese_support import command_line, devices, progress

# Ctrl-C in the first seconds, while Keras loads, gives one line too (main() says the rest).
command_line.quiet_interrupts_outside_main(__name__, "mnist_siamese.py")
import numpy as np

num_classes = 10
epochs = 20
# The example's other settings, named so that the command line can change them.
batch_size = 128
margin = 1.0
learning_rate = 0.001  # RMSprop's default in Keras
distance_threshold = 0.5  # a pair is called "same digit" below this distance
seed = 42  # the example is unseeded; a seed makes runs repeatable
dry_run_batch_size = 32
dry_run_epochs = 1
steps_per_execution = 32  # training steps per compiled call: round trips from Python cost

# The command line's defaults: the example's, and a dry run's (the subset shipped in data/).
PARSER_DEFAULTS = {
    "epochs": epochs,
    "batch_size": batch_size,
    "margin": margin,
    "learning_rate": learning_rate,
    "seed": seed,
    "dry_run_epochs": dry_run_epochs,
    "dry_run_batch_size": dry_run_batch_size,
    "dry_run_data": pathlib.Path(__file__).resolve().parent / "data" / "mnist-tiny.npz",
    "steps_per_execution": steps_per_execution,
}

if __name__ == "__main__":
    # --help and mistakes answer here, before Keras imports TensorFlow (about 5 s).
    command_line.parse_mnist_command(None, PARSER_DEFAULTS)

devices.require_backend("mnist_siamese.py")  # one that trains, installed (before Keras fails)
with devices.quiet_tensorflow_start():
    import keras
    from keras import layers, ops

    if keras.backend.backend() == "tensorflow":  # for tf.data; JAX and PyTorch go without
        import tensorflow as tf

from siamese_support import evaluation, mnist_data, pipelines, plots, run_folder, trained_model

# Larger batches to validate and evaluate: the same figures, and a pass took 0.09 s, not 0.12 s.
evaluation_batch_size = 1024


def euclidean_distance(vects):
    """Euclidean distance between two batches of vectors, kept away from zero.

    The square root's gradient is infinite at 0: the sum of squares is floored at epsilon.
    """
    x, y = vects
    sum_square = ops.sum(ops.square(x - y), axis=1, keepdims=True)
    return ops.sqrt(ops.maximum(sum_square, keras.config.epsilon()))


def eucl_dist_output_shape(shapes):
    """The shape of `euclidean_distance`'s output: one distance per pair."""
    shape1, _ = shapes
    return (shape1[0], 1)


@keras.saving.register_keras_serializable(package="mnist_siamese")
class EuclideanDistance(layers.Layer):
    """`euclidean_distance` as a layer, where the original has a `Lambda`: a saved `Lambda`
    holds Python bytecode, which Keras 3 refuses to load in its default safe mode.
    """

    def call(self, vects):
        return euclidean_distance(vects)

    def compute_output_shape(self, input_shape):
        return eucl_dist_output_shape(input_shape)


def contrastive_loss(y_true, y_pred, margin=margin):
    """Contrastive loss of Hadsell et al. 2006: mean(y d² + (1 - y) max(margin - d, 0)²).

    y = 1 for a pair of the same digit (the Keras example's convention), d the distance.
    """
    return ops.mean(contrastive_loss_per_pair(y_true, y_pred, margin))


def contrastive_loss_per_pair(y_true, y_pred, margin=margin):
    """The terms `contrastive_loss` averages, one per pair, in the shape of `y_pred`."""
    y_pred = ops.convert_to_tensor(y_pred)
    y_true = ops.reshape(ops.cast(y_true, y_pred.dtype), ops.shape(y_pred))
    square_pred = ops.square(y_pred)
    margin_square = ops.square(ops.maximum(margin - y_pred, 0.0))
    return y_true * square_pred + (1.0 - y_true) * margin_square


@keras.saving.register_keras_serializable(package="mnist_siamese")
class ContrastiveLoss(keras.losses.Loss):
    """`contrastive_loss` with its margin stored, so a saved model can be reloaded.

    It hands Keras the per-pair terms and lets Keras average them, which keeps the mean
    right when a batch is split across several devices.
    """

    def __init__(self, margin=margin, name="contrastive_loss", **kwargs):
        super().__init__(name=name, **kwargs)
        self.margin = margin

    def call(self, y_true, y_pred):
        return contrastive_loss_per_pair(y_true, y_pred, self.margin)

    def get_config(self):
        return {**super().get_config(), "margin": self.margin}


def create_pairs(x, digit_indices, rng=None):
    """Positive and negative pairs of images, alternating, as in the original example.

    For each class d and each i < n, where n is one less than the smallest class count,
    the pair (i-th, (i+1)-th image of d) is positive and the pair (i-th image of d, i-th
    image of a random other class) is negative; labels alternate 1, 0. Label 1 means "same
    digit", the Keras example's convention; the paper's Y is the opposite (Y = 0 similar).

    Unlike the original, the pairs are indices into `x` (int32, shape (pairs, 2)), not
    copies of the images: the input pipeline gathers the images batch by batch, so a pair
    costs 8 bytes instead of 6 KB. `rng` (a generator or a seed) draws the negative classes.
    Returns `(pairs, labels)`, the labels float32.
    """
    rng = np.random.default_rng(rng)
    class_count = len(digit_indices)
    if class_count < 2:
        raise ValueError("create_pairs needs at least two classes")
    n = min(len(indices) for indices in digit_indices) - 1
    if n < 1:
        sizes = {d: len(indices) for d, indices in enumerate(digit_indices)}
        raise ValueError(
            f"every class needs at least two images to make a positive pair; "
            f"images per class: {sizes}"
        )
    # Row d holds the first n + 1 images of class d.
    table = np.stack([np.asarray(indices[: n + 1]) for indices in digit_indices])
    if table.min() < 0 or table.max() >= len(x):
        raise ValueError("digit_indices refer to images outside x")
    classes = np.arange(class_count)[:, None]
    # The same shift rule as the original: another class, chosen uniformly.
    shift = rng.integers(1, class_count, size=(class_count, n))
    other_class = (classes + shift) % class_count
    positions = np.arange(n)
    positive = np.stack([table[:, :n], table[:, 1:]], axis=-1)
    negative = np.stack([table[:, :n], table[other_class, positions]], axis=-1)
    # Interleave so that each class contributes positive, negative, positive, ...
    pairs = np.stack([positive, negative], axis=2).reshape(-1, 2).astype(np.int32)
    labels = np.tile(np.array([1.0, 0.0], np.float32), class_count * n)
    return pairs, labels


def make_pair_dataset(images, pairs, labels=None, batch_size=batch_size, seed=None, place=()):
    """A `tf.data` pipeline of `((image_a, image_b), label)` batches from index pairs.

    The original fits on float32 copies of every pair's images. Here the uint8 images stay
    in one tensor, each batch gathers its pairs and scales them to [0, 1]. With `seed` the
    pairs come in a new order every epoch, as `fit()` shuffles arrays by default. Under JAX
    and PyTorch, the same batches from NumPy; `place` is `(process index, processes,
    devices)` of a run spread over several devices.
    """
    if keras.backend.backend() != "tensorflow":
        return pipelines.PairBatches(images, pairs, labels, batch_size, seed, *place)
    return pipelines.pair_dataset(images, pairs, labels, batch_size, seed)


def create_base_network(input_shape):
    """The embedding network shared by both branches (the example's MLP)."""
    inputs = keras.Input(shape=input_shape)
    x = layers.Flatten()(inputs)
    x = layers.Dense(128, activation="relu")(x)
    x = layers.Dropout(0.1)(x)
    x = layers.Dense(128, activation="relu")(x)
    x = layers.Dropout(0.1)(x)
    x = layers.Dense(128, activation="relu")(x)
    return keras.Model(inputs, x, name="base_network")


def create_conv_base_network(input_shape):
    """A small convnet (`--network conv`, not in the example) on 28×28×1 input."""
    inputs = keras.Input(shape=input_shape)
    x = layers.Reshape((*input_shape, 1))(inputs)
    x = layers.Conv2D(64, 3, activation="relu")(x)
    x = layers.Conv2D(32, 3, activation="relu")(x)
    x = layers.Flatten()(x)
    x = layers.Dense(128, activation="relu")(x)
    return keras.Model(inputs, x, name="base_network")


def create_siamese_network(input_shape, network="mlp"):
    """The example's "network definition": two inputs, one shared base network, their distance.

    Returns `(model, base_network)`.
    """
    builders = {"mlp": create_base_network, "conv": create_conv_base_network}
    if network not in builders:
        raise ValueError(f"network must be 'mlp' or 'conv', got {network!r}")
    base_network = builders[network](input_shape)
    input_a = keras.Input(shape=input_shape, name="image_a")
    input_b = keras.Input(shape=input_shape, name="image_b")
    # Because the same instance is called twice, the two branches share its weights.
    processed_a = base_network(input_a)
    processed_b = base_network(input_b)
    distance = EuclideanDistance(name="distance")([processed_a, processed_b])
    model = keras.Model([input_a, input_b], distance, name="siamese_network")
    return model, base_network


def compute_accuracy(y_true, y_pred, threshold=distance_threshold):
    """Fraction of pairs classified right by thresholding their distances (NumPy)."""
    pred = np.ravel(y_pred) < threshold
    return float(np.mean(pred == np.ravel(y_true)))


@keras.saving.register_keras_serializable(package="mnist_siamese")
def accuracy(y_true, y_pred):
    """Training-time accuracy metric with the same threshold (keras.ops).

    Returns 1 or 0 per pair (the original returns the batch mean); Keras averages them over
    all pairs seen, so a short last batch weighs no more than its pairs.
    """
    y_pred = ops.convert_to_tensor(y_pred)
    y_true = ops.reshape(ops.cast(y_true, y_pred.dtype), ops.shape(y_pred))
    predicted_same = ops.cast(y_pred < distance_threshold, y_pred.dtype)
    return ops.cast(ops.equal(y_true, predicted_same), "float32")


def train(
    model,
    train_dataset,
    test_dataset,
    epochs,
    margin,
    learning_rate,
    callbacks=(),
    steps_per_execution=steps_per_execution,
):
    """The example's "train" step: RMSprop, the contrastive loss, the test pairs validate.

    `steps_per_execution`: steps per call into the compiled loop (`--steps-per-execution`).
    """
    model.compile(
        loss=ContrastiveLoss(margin=margin),
        optimizer=keras.optimizers.RMSprop(learning_rate=learning_rate),
        metrics=[accuracy],
        # One step per call under MirroredStrategy and PyTorch (see `steps_per_call`).
        steps_per_execution=devices.steps_per_call(steps_per_execution),
        # XLA was measured under TensorFlow: its compile time (2-4 s) outweighed what it
        # saved. JAX always compiles; "auto" lets each other backend choose.
        jit_compile=False if keras.backend.backend() == "tensorflow" else "auto",
    )
    return model.fit(
        train_dataset,
        epochs=epochs,
        validation_data=test_dataset,
        callbacks=list(callbacks),
        shuffle=False,  # the dataset reshuffles itself every epoch
        verbose=progress.fit_verbosity(),
    )


def predict_distances(base_network, images, pairs):
    """The distance the Siamese model gives each index pair of `images`, as a 1-D array.

    The original runs the whole model on every pair. Here each image is embedded once by
    the shared base network and the pairs' distances are taken between those embeddings:
    the same function of the same weights, with a third of the work on MNIST, where an
    image appears in about four pairs, and without holding batches of pair images.
    """
    return evaluation.embedded_pair_distances(
        base_network, euclidean_distance, images, pairs, evaluation_batch_size
    )


@command_line.reports_errors("mnist_siamese.py")  # a user's mistake: one line, exit code 2
def main(argv=None):
    """Run the example from the command line; return the process's exit code."""
    _, args = command_line.parse_mnist_command(argv, PARSER_DEFAULTS)
    if args.command:  # use a trained model: `compare`, `export` (see `COMMAND --help`)
        return trained_model.run_command(args, __file__, euclidean_distance, distance_threshold)
    # The run folder: one run at a time, resumable; process 0 of several writes the outputs.
    folder = (args.output_dir, args.resume, args.overwrite, args.dry_run)
    with run_folder.Run(*folder, devices.process_place(args.distribute), epochs=args.epochs) as run:
        args.intra_op_threads = devices.configure_threads(args.intra_op_threads, args.network)
        placement = devices.place_training(args.distribute, args.batch_size, args.seed)

        # The data, split between train and test sets (uint8; scaled batch by batch).
        (x_train, y_train), (x_test, y_test) = mnist_data.load_limited(args.data, args.limit)

        # Create training+test positive and negative pairs.
        rng = np.random.default_rng(args.seed)
        digit_indices = [np.where(y_train == i)[0] for i in range(num_classes)]
        tr_pairs, tr_y = create_pairs(x_train, digit_indices, rng)
        digit_indices = [np.where(y_test == i)[0] for i in range(num_classes)]
        te_pairs, te_y = create_pairs(x_test, digit_indices, rng)
        training_pairs = f"{len(tr_pairs)} training pairs from {len(x_train)} images"
        print(f"{training_pairs}, {len(te_pairs)} test pairs from {len(x_test)} images", flush=True)
        per_call = (args.steps_per_execution, steps_per_execution, len(tr_pairs), args.batch_size)
        args.steps_per_execution = devices.choose_steps_per_execution(*per_call, placement)
        output_dir = run.start()

        # Network definition.
        with placement.scope():
            model, base_network = create_siamese_network(x_train.shape[1:], args.network)

        # Train. The training images are held once, as one tensor under TensorFlow (memory).
        if keras.backend.backend() == "tensorflow":
            x_train = tf.convert_to_tensor(x_train)
        place = placement.share  # this process's part of each batch (several devices)
        tr_dataset = make_pair_dataset(x_train, tr_pairs, tr_y, args.batch_size, args.seed, place)
        te_dataset = make_pair_dataset(x_test, te_pairs, te_y, evaluation_batch_size, None, place)
        training = (args.epochs, args.margin, args.learning_rate, run.callbacks)
        with placement.scope():
            train(model, tr_dataset, te_dataset, *training, args.steps_per_execution)

        # Compute final accuracy on training and test sets (dropout off).
        tr_distances = predict_distances(base_network, x_train, tr_pairs)
        te_distances = predict_distances(base_network, x_test, te_pairs)
        tr_acc = compute_accuracy(tr_y, tr_distances)
        te_acc = compute_accuracy(te_y, te_distances)

        # The port's extras: plots, the models, the history and metrics.json, last.
        metrics = {"train_accuracy": tr_acc, "test_accuracy": te_acc}
        metrics.update(evaluation.pair_metrics(tr_y, tr_distances, te_y, te_distances))
        if run.writes_outputs and not args.no_plots:
            figures = (x_test, te_pairs, te_y, te_distances, metrics["best_threshold"])
            embedding_map = (evaluation.embed_digits(base_network, x_test), y_test)
            plots.plot_mnist_run(output_dir, run.history(), *figures, *embedding_map)
        models = {"siamese_model.keras": model, "embedding_network.keras": base_network}
        settings = {name: getattr(args, name) for name in command_line.MNIST_RUN_SETTINGS}
        settings.update(backend=keras.backend.backend(), processes=placement.process_count)
        settings.update(training_pairs=len(tr_pairs), test_pairs=len(te_pairs))
        if run.finish(models, metrics, settings):
            print(f"Saved models, history, metrics and plots in {output_dir}")
            print(f"* Accuracy on training set: {100 * tr_acc:0.2f}%")
            print(f"* Accuracy on test set: {100 * te_acc:0.2f}%")
    return 0


if __name__ == "__main__":
    # After a failed multi-process run, exit without waiting for the lost processes.
    sys.exit(devices.leave(main()))
