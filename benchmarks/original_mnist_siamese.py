"""The original Keras 2 MNIST Siamese example's procedure, as a baseline to time against.

    # Keras 2 in its own environment, so that its install cannot move TensorFlow's version;
    # it is not a project dependency.
    python -m venv --system-site-packages /tmp/venv-legacy
    /tmp/venv-legacy/bin/pip install --no-deps "tf_keras==$(python -c \\
        'import tensorflow; print(tensorflow.__version__)')"
    # the first 22,699 training images and the test set, from Keras's downloaded MNIST
    python tools/make_mnist_fixture.py --output /tmp/mnist-22699.npz --train 22699 --test 10000
    python benchmarks/timed.py --runs 3 -- /tmp/venv-legacy/bin/python \\
        benchmarks/original_mnist_siamese.py --data /tmp/mnist-22699.npz

This is not the original file: it re-creates, in the project's own code, what the original
does that costs time and memory, so that both can be measured on the same machine. Pairs
are built with a Python loop that copies every image pair into float32 arrays; the model is
a Keras 2 `Lambda` Siamese MLP fitted on those arrays (batch 128, RMSprop, 20 epochs by
default) with the test pairs as validation data; the final accuracies come from `predict`
on every training and test pair. The pair rule, network, loss and accuracy are those of
`mnist_siamese.py` (which keeps the original's definitions).
"""

import argparse
import random
import sys
import time

import numpy as np
import tf_keras as keras
from tf_keras import backend

num_classes = 10
margin = 1.0


def create_pairs(x, digit_indices):
    """Positive and negative pairs of images, copied one pair at a time (the original's way)."""
    pairs, labels = [], []
    n = min(len(indices) for indices in digit_indices) - 1
    for digit in range(num_classes):
        for i in range(n):
            first, second = digit_indices[digit][i], digit_indices[digit][i + 1]
            pairs.append([x[first], x[second]])
            other = (digit + random.randrange(1, num_classes)) % num_classes
            first, second = digit_indices[digit][i], digit_indices[other][i]
            pairs.append([x[first], x[second]])
            labels += [1, 0]
    return np.array(pairs), np.array(labels)


def euclidean_distance(vectors):
    """Distance between the two embeddings, floored at epsilon under the square root."""
    first, second = vectors
    sum_square = backend.sum(backend.square(first - second), axis=1, keepdims=True)
    return backend.sqrt(backend.maximum(sum_square, backend.epsilon()))


def contrastive_loss(y_true, y_pred):
    """Hadsell et al.'s contrastive loss with y = 1 for a pair of the same digit."""
    y_true = backend.cast(y_true, y_pred.dtype)
    margin_square = backend.square(backend.maximum(margin - y_pred, 0))
    return backend.mean(y_true * backend.square(y_pred) + (1 - y_true) * margin_square)


def accuracy(y_true, y_pred):
    """Training-time accuracy with the 0.5 distance threshold."""
    predicted_same = backend.cast(y_pred < 0.5, y_true.dtype)
    return backend.mean(backend.equal(y_true, predicted_same))


def compute_accuracy(y_true, y_pred):
    """Final accuracy with the same threshold, in NumPy."""
    return np.mean((y_pred.ravel() < 0.5) == y_true)


def create_base_network(input_shape):
    """The shared MLP: three Dense(128) layers with dropout between them."""
    inputs = keras.Input(shape=input_shape)
    x = keras.layers.Flatten()(inputs)
    x = keras.layers.Dense(128, activation="relu")(x)
    x = keras.layers.Dropout(0.1)(x)
    x = keras.layers.Dense(128, activation="relu")(x)
    x = keras.layers.Dropout(0.1)(x)
    x = keras.layers.Dense(128, activation="relu")(x)
    return keras.Model(inputs, x)


def main(argv=None):
    """Load the data, build pairs, train, report accuracies and seconds per epoch."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="a mnist.npz-style file")
    parser.add_argument("--epochs", type=int, default=20)
    args = parser.parse_args(argv)

    with np.load(args.data) as data:
        x_train, y_train = data["x_train"], data["y_train"]
        x_test, y_test = data["x_test"], data["y_test"]
    x_train = x_train.astype("float32") / 255
    x_test = x_test.astype("float32") / 255
    input_shape = x_train.shape[1:]

    digit_indices = [np.where(y_train == i)[0] for i in range(num_classes)]
    tr_pairs, tr_y = create_pairs(x_train, digit_indices)
    digit_indices = [np.where(y_test == i)[0] for i in range(num_classes)]
    te_pairs, te_y = create_pairs(x_test, digit_indices)

    base_network = create_base_network(input_shape)
    input_a = keras.Input(shape=input_shape)
    input_b = keras.Input(shape=input_shape)
    distance = keras.layers.Lambda(euclidean_distance)(
        [base_network(input_a), base_network(input_b)]
    )
    model = keras.Model([input_a, input_b], distance)
    model.compile(loss=contrastive_loss, optimizer=keras.optimizers.RMSprop(), metrics=[accuracy])

    started = time.perf_counter()
    model.fit(
        [tr_pairs[:, 0], tr_pairs[:, 1]],
        tr_y,
        batch_size=128,
        epochs=args.epochs,
        validation_data=([te_pairs[:, 0], te_pairs[:, 1]], te_y),
        verbose=2,
    )
    seconds_per_epoch = (time.perf_counter() - started) / args.epochs

    tr_acc = compute_accuracy(tr_y, model.predict([tr_pairs[:, 0], tr_pairs[:, 1]], verbose=0))
    te_acc = compute_accuracy(te_y, model.predict([te_pairs[:, 0], te_pairs[:, 1]], verbose=0))
    print(f"seconds_per_epoch {seconds_per_epoch:.2f}")
    print(f"* Accuracy on training set: {100 * tr_acc:0.2f}%")
    print(f"* Accuracy on test set: {100 * te_acc:0.2f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
