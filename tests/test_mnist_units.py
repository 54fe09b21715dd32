"""Unit tests of mnist_siamese.py's building blocks, in process, against NumPy references.

Everything here runs on small arrays generated in the test or on data/mnist-tiny.npz, so the
module costs little more than the TensorFlow import.
"""

import csv
import gzip
import re
import struct

import keras
import numpy as np
import pytest
from helpers import FIXTURE
from keras import ops

import mnist_siamese
from siamese_support import evaluation, mnist_data, pipelines, run_folder

EPSILON = keras.config.epsilon()
# These tests run under whichever Keras backend the environment names; CI runs them under
# TensorFlow and, without TensorFlow installed, under JAX. A few check TensorFlow's pieces.
tensorflow_only = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow", reason="checks TensorFlow's pipeline or tape"
)


def as_numpy(value):
    return ops.convert_to_numpy(value)


def to_numpy(value):
    """A backend tensor (or anything array-like) as a NumPy array."""
    return np.asarray(ops.convert_to_numpy(value))


def reference_distance(a, b):
    """sqrt(max(sum of squares, epsilon)) per row, shape (n, 1), in float64."""
    sum_square = np.sum((np.float64(a) - np.float64(b)) ** 2, axis=1, keepdims=True)
    return np.sqrt(np.maximum(sum_square, EPSILON))


def reference_loss_terms(labels, distances, margin=1.0):
    """The contrastive loss of each pair: y * d^2 + (1 - y) * max(margin - d, 0)^2."""
    labels = np.float64(np.ravel(labels))
    distances = np.float64(np.ravel(distances))
    return labels * distances**2 + (1 - labels) * np.maximum(margin - distances, 0) ** 2


def brute_force_auc(labels, distances):
    """P(positive pair closer than negative pair), ties counting half, over all pairs."""
    labels = np.ravel(labels).astype(bool)
    distances = np.ravel(distances)
    positive, negative = distances[labels], distances[~labels]
    closer = (positive[:, None] < negative[None, :]).sum()
    tied = (positive[:, None] == negative[None, :]).sum()
    return (closer + 0.5 * tied) / (len(positive) * len(negative))


def brute_force_best_accuracy(labels, distances):
    """The best accuracy of `distance < t` over every threshold that can make a difference."""
    unique = np.unique(distances)
    candidates = np.concatenate(
        [[unique[0] - 1.0], (unique[:-1] + unique[1:]) / 2, [unique[-1] + 1.0]]
    )
    labels = np.ravel(labels).astype(bool)
    return max(np.mean((distances < t) == labels) for t in candidates)


def digit_indices_of(labels, classes=10):
    return [np.where(labels == d)[0] for d in range(classes)]


def write_idx(path, array):
    """Write a uint8 array as a gzip-compressed IDX file (the MNIST format)."""
    array = np.asarray(array, np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as stream:
        stream.write(header + array.tobytes())


@pytest.fixture(scope="module")
def tiny():
    with np.load(FIXTURE) as archive:
        return {name: archive[name] for name in archive.files}


# ---------------------------------------------------------------------------
# Distance and loss
# ---------------------------------------------------------------------------


def test_euclidean_distance_matches_numpy_on_random_vectors():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(64, 16)).astype("float32")
    b = rng.normal(size=(64, 16)).astype("float32")
    got = to_numpy(mnist_siamese.euclidean_distance([a, b]))
    assert got.shape == (64, 1)
    np.testing.assert_allclose(got, reference_distance(a, b), rtol=1e-5)


def gradient_of_total_distance(a):
    """The gradient of the summed distances of `a` to itself, on the backend in use."""
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        x = tf.Variable(a)
        with tf.GradientTape() as tape:
            total = tf.reduce_sum(mnist_siamese.euclidean_distance([x, tf.constant(a)]))
        return tape.gradient(total, x).numpy()
    if keras.backend.backend() == "jax":
        import jax

        def total(x):
            return ops.sum(mnist_siamese.euclidean_distance([x, a]))

        return np.asarray(jax.grad(total)(a))
    pytest.skip(f"no gradient helper for the {keras.backend.backend()} backend")


def test_euclidean_distance_is_floored_at_sqrt_epsilon_with_finite_gradient():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(5, 8)).astype("float32")
    b = a.copy()
    b[3] += 2e-5  # sum of squares ~ 3e-9, far below epsilon: still floored
    b[4] += 1.0  # a real distance
    got = to_numpy(mnist_siamese.euclidean_distance([a, b])).ravel()
    np.testing.assert_allclose(got[:4], np.sqrt(EPSILON), rtol=1e-4)
    np.testing.assert_allclose(got[4], np.sqrt(8.0), rtol=1e-5)

    # The floor is there so that identical inputs do not give an infinite/NaN gradient.
    assert np.all(np.isfinite(gradient_of_total_distance(a)))


def test_euclidean_distance_layer_matches_function_and_round_trips():
    rng = np.random.default_rng(2)
    a = rng.normal(size=(7, 3)).astype("float32")
    b = rng.normal(size=(7, 3)).astype("float32")
    layer = mnist_siamese.EuclideanDistance(name="distance")
    np.testing.assert_allclose(
        to_numpy(layer([a, b])), to_numpy(mnist_siamese.euclidean_distance([a, b]))
    )
    assert tuple(layer.compute_output_shape([(None, 3), (None, 3)])) == (None, 1)
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert isinstance(restored, mnist_siamese.EuclideanDistance)
    np.testing.assert_allclose(to_numpy(restored([a, b])), reference_distance(a, b), rtol=1e-5)


def test_contrastive_loss_matches_numpy_on_random_pairs():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, size=200).astype("float32")
    distances = rng.uniform(0, 2, size=(200, 1)).astype("float32")
    expected = reference_loss_terms(labels, distances).mean()
    # Labels as Keras hands them over from a dataset, (n, 1), and as a flat (n,) vector:
    # the flat one must not broadcast against (n, 1) into an (n, n) matrix.
    for y_true in (labels[:, None], labels):
        got = float(to_numpy(mnist_siamese.contrastive_loss(y_true, distances)))
        assert got == pytest.approx(expected, rel=1e-5)


def test_contrastive_loss_at_the_margin_edge():
    margin = 1.0
    # (label, distance, expected loss term)
    cases = [
        (0, margin, 0.0),  # exactly at the margin: a negative pair costs nothing
        (0, margin + 0.5, 0.0),  # beyond the margin: nothing either, not a negative cost
        (0, margin - 0.25, 0.25**2),  # just inside the margin
        (0, 0.0, margin**2),  # zero distance: the full margin squared
        (1, 0.0, 0.0),  # identical positive pair costs nothing
        (1, margin, margin**2),  # positive pairs cost d^2 whatever the margin
        (1, 2.5, 6.25),
    ]
    for label, distance, expected in cases:
        got = float(
            to_numpy(mnist_siamese.contrastive_loss(np.array([[label]], "float32"), [[distance]]))
        )
        assert got == pytest.approx(expected, abs=1e-6), (label, distance)
    labels = np.array([c[0] for c in cases], "float32")
    distances = np.array([[c[1]] for c in cases], "float32")
    got = float(to_numpy(mnist_siamese.contrastive_loss(labels, distances)))
    assert got == pytest.approx(np.mean([c[2] for c in cases]), rel=1e-6)


def test_contrastive_loss_with_epsilon_floored_distance():
    # A pair of identical embeddings: the model outputs sqrt(epsilon), not 0.
    a = np.ones((2, 4), "float32")
    distance = mnist_siamese.euclidean_distance([a, a])
    got = to_numpy(mnist_siamese.contrastive_loss(np.array([1.0, 0.0], "float32"), distance))
    expected = reference_loss_terms([1, 0], [np.sqrt(EPSILON)] * 2).mean()
    assert float(got) == pytest.approx(expected, rel=1e-5)


def test_contrastive_loss_class_with_custom_margin_and_config_round_trip():
    rng = np.random.default_rng(4)
    labels = rng.integers(0, 2, size=(50, 1)).astype("float32")
    distances = rng.uniform(0, 3, size=(50, 1)).astype("float32")
    distances[:5] = 2.5  # exactly at the custom margin
    loss = mnist_siamese.ContrastiveLoss(margin=2.5)
    expected = reference_loss_terms(labels, distances, margin=2.5).mean()
    assert float(to_numpy(loss(labels, distances))) == pytest.approx(expected, rel=1e-5)
    # The default margin would give another value: the margin is really used.
    default = reference_loss_terms(labels, distances, margin=1.0).mean()
    assert abs(expected - default) > 1e-3

    config = loss.get_config()
    assert config["margin"] == 2.5
    restored = mnist_siamese.ContrastiveLoss.from_config(config)
    assert restored.margin == 2.5
    assert restored.name == loss.name
    assert float(to_numpy(restored(labels, distances))) == pytest.approx(expected, rel=1e-5)
    # Through Keras's registry too, as load_model does.
    serialized = keras.saving.serialize_keras_object(loss)
    again = keras.saving.deserialize_keras_object(serialized)
    assert isinstance(again, mnist_siamese.ContrastiveLoss)
    assert again.margin == 2.5


# ---------------------------------------------------------------------------
# Pairs
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def uneven_labels():
    """Labels of 10 classes with uneven counts (smallest: class 4 with 7 images), shuffled."""
    rng = np.random.default_rng(5)
    counts = [12, 9, 15, 8, 7, 11, 10, 20, 9, 13]
    labels = np.concatenate([np.full(c, d) for d, c in enumerate(counts)])
    return rng.permutation(labels)


def test_create_pairs_invariants(uneven_labels):
    labels = uneven_labels
    x = np.zeros((len(labels), 28, 28), np.uint8)
    digit_indices = digit_indices_of(labels)
    pairs, pair_labels = mnist_siamese.create_pairs(x, digit_indices, 0)
    n = 7 - 1
    assert pairs.shape == (2 * 10 * n, 2)
    assert pair_labels.shape == (2 * 10 * n,)
    assert np.issubdtype(pairs.dtype, np.integer)
    np.testing.assert_array_equal(pair_labels, np.tile([1.0, 0.0], 10 * n))
    assert pairs.min() >= 0 and pairs.max() < len(labels)

    first_class, second_class = labels[pairs[:, 0]], labels[pairs[:, 1]]
    positive = pair_labels == 1
    assert np.all(first_class[positive] == second_class[positive])
    assert np.all(first_class[~positive] != second_class[~positive])

    # Class-major order: for class d and i < n, the positive pair is (i-th, (i+1)-th image
    # of d) and the negative pair starts from the i-th image of d and goes to the i-th
    # image of another class.
    row = 0
    for d in range(10):
        for i in range(n):
            assert tuple(pairs[row]) == (digit_indices[d][i], digit_indices[d][i + 1])
            first, second = pairs[row + 1]
            assert first == digit_indices[d][i]
            other = labels[second]
            assert other != d and second == digit_indices[other][i]
            row += 2


def test_create_pairs_negatives_reach_every_other_class():
    labels = np.repeat(np.arange(10), 60)
    pairs, pair_labels = mnist_siamese.create_pairs(labels, digit_indices_of(labels), 0)
    negatives = pairs[pair_labels == 0]
    for d in range(10):
        partners = set(labels[negatives[labels[negatives[:, 0]] == d][:, 1]].tolist())
        assert partners == set(range(10)) - {d}, d


def test_create_pairs_is_deterministic_per_seed(uneven_labels):
    digit_indices = digit_indices_of(uneven_labels)
    x = uneven_labels
    first, first_labels = mnist_siamese.create_pairs(x, digit_indices, 123)
    again, again_labels = mnist_siamese.create_pairs(x, digit_indices, 123)
    np.testing.assert_array_equal(first, again)
    np.testing.assert_array_equal(first_labels, again_labels)
    # A Generator with the same seed gives the same pairs as the seed itself.
    from_generator, _ = mnist_siamese.create_pairs(x, digit_indices, np.random.default_rng(123))
    np.testing.assert_array_equal(first, from_generator)
    other, _ = mnist_siamese.create_pairs(x, digit_indices, 124)
    # Positive pairs do not depend on the seed, the negative partners do.
    np.testing.assert_array_equal(first[::2], other[::2])
    assert not np.array_equal(first[1::2], other[1::2])


@pytest.mark.parametrize("short_class_size", [0, 1])
def test_create_pairs_refuses_a_class_without_two_images(short_class_size):
    labels = np.concatenate([np.repeat(np.arange(9), 5), np.full(short_class_size, 9)])
    with pytest.raises(ValueError, match="two images"):
        mnist_siamese.create_pairs(labels, digit_indices_of(labels), 0)


def batches_of(dataset):
    """One epoch of `make_pair_dataset`'s batches: a tf.data pass, or a PyDataset's."""
    if isinstance(dataset, keras.utils.PyDataset):
        batches = [dataset[index] for index in range(len(dataset))]
        dataset.on_epoch_end()
        return batches
    return list(dataset)


def test_make_pair_dataset_gathers_scaled_images_in_order():
    rng = np.random.default_rng(6)
    # Image i is filled with the value 10 * i + 3, so every gathered image names its index.
    images = (np.arange(20, dtype=np.uint8)[:, None, None] * 10 + 3) * np.ones(
        (1, 28, 28), np.uint8
    )
    images[:, 0, 0] = 255  # one full-intensity pixel per image
    pairs = rng.integers(0, 20, size=(37, 2)).astype(np.int32)
    labels = rng.integers(0, 2, size=37).astype(np.float32)
    dataset = mnist_siamese.make_pair_dataset(images, pairs, labels, batch_size=8)
    firsts, seconds, got_labels, batch_sizes = [], [], [], []
    for (image_a, image_b), label in batches_of(dataset):
        image_a, image_b, label = as_numpy(image_a), as_numpy(image_b), as_numpy(label)
        assert image_a.dtype == np.float32 and image_b.dtype == np.float32
        assert label.shape == (len(image_a), 1)
        firsts.append(image_a)
        seconds.append(image_b)
        got_labels.append(label)
        batch_sizes.append(len(image_a))
    assert batch_sizes == [8, 8, 8, 8, 5]
    firsts, seconds = np.concatenate(firsts), np.concatenate(seconds)
    expected_a = images[pairs[:, 0]].astype(np.float32) / 255.0
    expected_b = images[pairs[:, 1]].astype(np.float32) / 255.0
    np.testing.assert_allclose(firsts, expected_a, rtol=1e-6)
    np.testing.assert_allclose(seconds, expected_b, rtol=1e-6)
    assert firsts.min() >= 0.0 and firsts.max() == pytest.approx(1.0)
    np.testing.assert_array_equal(np.concatenate(got_labels).ravel(), labels)


@tensorflow_only
def test_pair_and_evaluation_pipelines_run_without_autotuning():
    import tensorflow as tf

    images = np.zeros((4, 28, 28), np.uint8)
    pairs = np.array([[0, 1], [2, 3]], np.int32)
    labels = np.array([1.0, 0.0], np.float32)
    for seed in (None, 5):
        dataset = mnist_siamese.make_pair_dataset(images, pairs, labels, 2, seed=seed)
        assert dataset.options().autotune.enabled is False
    plain = tf.data.Dataset.range(3)
    assert plain.options().autotune.enabled is not False
    assert pipelines.without_autotuning(plain).options().autotune.enabled is False


def test_make_pair_dataset_with_seed_visits_every_pair_once_per_epoch():
    images = np.arange(30, dtype=np.uint8)[:, None, None] * np.ones((1, 4, 4), np.uint8)
    pairs = np.stack([np.arange(30), (np.arange(30) + 7) % 30], axis=1).astype(np.int32)
    labels = (np.arange(30) % 2).astype(np.float32)
    dataset = mnist_siamese.make_pair_dataset(images, pairs, labels, batch_size=4, seed=9)

    def one_epoch():
        seen = []
        for (image_a, image_b), label in batches_of(dataset):
            first = np.rint(as_numpy(image_a)[:, 0, 0] * 255).astype(int)
            second = np.rint(as_numpy(image_b)[:, 0, 0] * 255).astype(int)
            labels_seen = as_numpy(label).ravel().tolist()
            seen += list(zip(first.tolist(), second.tolist(), labels_seen, strict=True))
        return seen

    epochs = [one_epoch() for _ in range(3)]
    expected = sorted(zip(pairs[:, 0].tolist(), pairs[:, 1].tolist(), labels.tolist(), strict=True))
    for seen in epochs:
        assert sorted(seen) == expected  # each pair once, with its own label
    assert len({tuple(seen) for seen in epochs}) > 1  # the order changes between epochs


# ---------------------------------------------------------------------------
# Accuracy and evaluation
# ---------------------------------------------------------------------------


def test_compute_accuracy_on_hand_made_cases():
    labels = np.array([1, 0, 1, 0], "float32")
    distances = np.array([[0.1], [0.9], [0.7], [0.2]], "float32")
    # right, right, wrong (same digit but far), wrong (different digits but close)
    assert mnist_siamese.compute_accuracy(labels, distances) == pytest.approx(0.5)
    # threshold 0.8: the 0.7 positive becomes right
    assert mnist_siamese.compute_accuracy(labels, distances, 0.8) == pytest.approx(0.75)
    # threshold 0.15: the 0.2 negative becomes right, the 0.7 positive stays wrong
    assert mnist_siamese.compute_accuracy(labels, distances, 0.15) == pytest.approx(0.75)
    assert mnist_siamese.compute_accuracy([1, 1, 0], [0.0, 0.49, 3.0]) == 1.0
    assert mnist_siamese.compute_accuracy([1, 0], [0.9, 0.1]) == 0.0
    # The threshold is strict: a distance of exactly 0.5 is called "different".
    assert mnist_siamese.compute_accuracy([1, 0], [0.5, 0.5]) == 0.5
    assert mnist_siamese.compute_accuracy([0], [0.5]) == 1.0


def test_accuracy_metric_agrees_with_compute_accuracy():
    rng = np.random.default_rng(7)
    labels = rng.integers(0, 2, size=(300, 1)).astype("float32")
    distances = rng.uniform(0, 1, size=(300, 1)).astype("float32")
    distances[:10] = 0.5  # on the threshold
    per_pair = to_numpy(mnist_siamese.accuracy(labels, distances))
    assert float(np.mean(per_pair)) == pytest.approx(
        mnist_siamese.compute_accuracy(labels, distances)
    )
    per_pair_flat = to_numpy(mnist_siamese.accuracy(labels.ravel(), distances))
    assert float(np.mean(per_pair_flat)) == pytest.approx(
        mnist_siamese.compute_accuracy(labels, distances)
    )
    # As Keras uses it: a compiled metric averaged over several batches of unequal size.
    metric = keras.metrics.MeanMetricWrapper(mnist_siamese.accuracy)
    for start in range(0, 300, 128):
        metric.update_state(labels[start : start + 128], distances[start : start + 128])
    assert float(to_numpy(metric.result())) == pytest.approx(
        mnist_siamese.compute_accuracy(labels, distances), abs=1e-6
    )


def test_roc_auc_matches_brute_force_with_ties():
    rng = np.random.default_rng(8)
    for trial in range(5):
        labels = rng.integers(0, 2, size=150)
        labels[:2] = [0, 1]
        distances = rng.uniform(0, 1.5, size=150) - 0.3 * labels
        if trial % 2:
            distances = np.round(distances, 1)  # many ties, across and within classes
        got = evaluation.roc_auc(labels, distances)
        assert got == pytest.approx(brute_force_auc(labels, distances), abs=1e-12)
    assert evaluation.roc_auc([1, 1, 0, 0], [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert evaluation.roc_auc([1, 1, 0, 0], [0.3, 0.4, 0.1, 0.2]) == 0.0
    assert evaluation.roc_auc([1, 0], [0.5, 0.5]) == 0.5


def test_roc_auc_needs_both_kinds_of_pair():
    with pytest.raises(ValueError):
        evaluation.roc_auc([1, 1, 1], [0.1, 0.2, 0.3])


def test_best_threshold_matches_brute_force():
    rng = np.random.default_rng(9)
    for trial in range(6):
        labels = rng.integers(0, 2, size=120)
        distances = rng.uniform(0, 1.5, size=120) - 0.4 * labels
        if trial % 2:
            distances = np.round(distances, 1)
        threshold, best = evaluation.best_threshold(labels, distances)
        assert best == pytest.approx(brute_force_best_accuracy(labels, distances), abs=1e-12)
        # The returned threshold really achieves the returned accuracy.
        assert mnist_siamese.compute_accuracy(labels, distances, threshold) == pytest.approx(best)


def test_best_threshold_at_the_ends():
    # All pairs positive: the best threshold calls every one "same".
    threshold, best = evaluation.best_threshold([1, 1, 1], [0.2, 0.4, 0.9])
    assert best == 1.0 and threshold > 0.9
    # All negative: the best threshold calls none "same".
    threshold, best = evaluation.best_threshold([0, 0], [0.2, 0.4])
    assert best == 1.0 and threshold <= 0.2
    threshold, best = evaluation.best_threshold([1, 1, 0, 0], [0.1, 0.3, 0.5, 0.7])
    assert best == 1.0 and 0.3 < threshold <= 0.5


# ---------------------------------------------------------------------------
# Model: the two branches share one base network
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("network", ["mlp", "conv"])
def test_siamese_branches_share_the_same_variables(network):
    keras.utils.set_random_seed(0)
    model, base_network = mnist_siamese.create_siamese_network((28, 28), network)
    assert isinstance(base_network, keras.Model)
    # The base network is one layer of the model, called on both inputs.
    nested = [layer for layer in model.layers if isinstance(layer, keras.Model)]
    assert nested == [base_network]
    assert len(model.inputs) == 2
    assert tuple(model.outputs[0].shape) == (None, 1)
    model_variables = [id(v) for v in model.trainable_variables]
    base_variables = [id(v) for v in base_network.trainable_variables]
    assert len(base_variables) > 0
    assert sorted(model_variables) == sorted(base_variables)

    rng = np.random.default_rng(10)
    image_a = rng.uniform(0, 1, size=(6, 28, 28)).astype("float32")
    image_b = rng.uniform(0, 1, size=(6, 28, 28)).astype("float32")

    def branch_outputs():
        return to_numpy(base_network(image_a, training=False)), to_numpy(
            base_network(image_b, training=False)
        )

    def model_distance():
        return to_numpy(model([image_a, image_b], training=False))

    embedding_a, embedding_b = branch_outputs()
    np.testing.assert_allclose(
        model_distance(), reference_distance(embedding_a, embedding_b), rtol=1e-4, atol=1e-6
    )
    # Identical inputs on both sides: identical embeddings, distance at the floor.
    same = to_numpy(model([image_a, image_a], training=False))
    np.testing.assert_allclose(same, np.sqrt(EPSILON), rtol=1e-4)

    # Perturb one weight of the base network: both branch outputs change, and the model's
    # distance is still the distance between the new embeddings (neither branch kept a copy).
    kernel = base_network.trainable_variables[0]
    kernel.assign(kernel + rng.normal(0, 0.5, size=kernel.shape).astype("float32"))
    new_a, new_b = branch_outputs()
    assert not np.allclose(new_a, embedding_a)
    assert not np.allclose(new_b, embedding_b)
    np.testing.assert_allclose(
        model_distance(), reference_distance(new_a, new_b), rtol=1e-4, atol=1e-6
    )


def test_create_siamese_network_rejects_unknown_network():
    with pytest.raises(ValueError):
        mnist_siamese.create_siamese_network((28, 28), "resnet")


def test_base_networks_have_the_documented_layers():
    mlp = mnist_siamese.create_base_network((28, 28))
    dense = [layer for layer in mlp.layers if isinstance(layer, keras.layers.Dense)]
    dropout = [layer for layer in mlp.layers if isinstance(layer, keras.layers.Dropout)]
    assert [layer.units for layer in dense] == [128, 128, 128]
    assert all(layer.activation.__name__ == "relu" for layer in dense)
    assert [layer.rate for layer in dropout] == [0.1, 0.1]
    conv = mnist_siamese.create_conv_base_network((28, 28))
    convolutions = [layer for layer in conv.layers if isinstance(layer, keras.layers.Conv2D)]
    assert [(layer.filters, layer.kernel_size) for layer in convolutions] == [
        (64, (3, 3)),
        (32, (3, 3)),
    ]
    assert tuple(conv.outputs[0].shape) == (None, 128)


# ---------------------------------------------------------------------------
# Data files
# ---------------------------------------------------------------------------


def test_read_idx_round_trips_images_and_labels(tmp_path):
    rng = np.random.default_rng(11)
    images = rng.integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, size=5, dtype=np.uint8)
    write_idx(tmp_path / "images.gz", images)
    write_idx(tmp_path / "labels.gz", labels)
    got_images = mnist_data.read_idx(tmp_path / "images.gz")
    got_labels = mnist_data.read_idx(tmp_path / "labels.gz")
    assert got_images.dtype == np.uint8 and got_images.shape == (5, 7, 3)
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, labels)


def test_read_idx_rejects_bad_files(tmp_path):
    good = bytes([0, 0, 8, 3]) + struct.pack(">3I", 2, 4, 4) + bytes(32)

    def gz(name, content):
        path = tmp_path / name
        with gzip.open(path, "wb") as stream:
            stream.write(content)
        return path

    bad = {
        "short data": gz("short.gz", good[:-5]),
        "long data": gz("long.gz", good + b"\x00"),
        "truncated header": gz("header.gz", good[:9]),
        "tiny": gz("tiny.gz", b"\x00\x00"),
        "float IDX": gz("float.gz", bytes([0, 0, 0x0D, 1]) + struct.pack(">I", 1) + bytes(4)),
        "not IDX": gz("text.gz", b"hello, this is not an IDX file at all"),
    }
    not_gzip = tmp_path / "plain.gz"
    not_gzip.write_bytes(good)  # right content, but not compressed
    bad["not gzip"] = not_gzip
    whole = gzip.compress(good + bytes(1000))
    cut = tmp_path / "cut.gz"
    cut.write_bytes(whole[: len(whole) // 2])  # the gzip stream itself is truncated
    bad["truncated gzip"] = cut
    assert mnist_data.read_idx(gz("good.gz", good)).shape == (2, 4, 4)
    for what, path in bad.items():
        with pytest.raises(ValueError) as error:
            mnist_data.read_idx(path)
        assert str(path) in str(error.value), what


def test_load_mnist_from_a_folder_of_idx_files(tmp_path, tiny):
    subset = {
        "x_train": tiny["x_train"][:300],
        "y_train": tiny["y_train"][:300],
        "x_test": tiny["x_test"][:100],
        "y_test": tiny["y_test"][:100],
    }
    names = {
        "x_train": "train-images-idx3-ubyte.gz",
        "y_train": "train-labels-idx1-ubyte.gz",
        "x_test": "t10k-images-idx3-ubyte.gz",
        "y_test": "t10k-labels-idx1-ubyte.gz",
    }
    for key, name in names.items():
        write_idx(tmp_path / name, subset[key])
    (x_train, y_train), (x_test, y_test) = mnist_data.load_mnist(tmp_path)
    for key, got in zip(names, (x_train, y_train, x_test, y_test), strict=True):
        assert got.dtype == np.uint8, key
        np.testing.assert_array_equal(got, subset[key], err_msg=key)
    # The same folder given as a string works too.
    (x_again, _), _ = mnist_data.load_mnist(str(tmp_path))
    np.testing.assert_array_equal(x_again, subset["x_train"])

    (tmp_path / names["y_test"]).unlink()
    with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte.gz"):
        mnist_data.load_mnist(tmp_path)


def test_load_mnist_from_the_fixture_npz(tiny):
    (x_train, y_train), (x_test, y_test) = mnist_data.load_mnist(FIXTURE)
    assert x_train.shape == (5000, 28, 28) and x_test.shape == (1000, 28, 28)
    assert x_train.dtype == np.uint8 and y_train.dtype == np.uint8
    np.testing.assert_array_equal(x_test, tiny["x_test"])
    np.testing.assert_array_equal(y_train, tiny["y_train"])


def test_final_history_keeps_the_last_row_of_each_epoch(tmp_path):
    rows = [
        {"epoch": "0", "loss": "0.30"},
        {"epoch": "1", "loss": "0.20"},
        {"epoch": "1", "loss": "0.19"},  # epoch 1 logged again after a resume
        {"epoch": "2", "loss": "0.10"},
    ]
    with open(tmp_path / "history-progress.csv", "w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=["epoch", "loss"])
        writer.writeheader()
        writer.writerows(rows)
    history = run_folder.final_history(tmp_path)
    assert [row["epoch"] for row in history] == ["0", "1", "2"]
    assert [row["loss"] for row in history] == ["0.30", "0.19", "0.10"]


def test_registered_names_are_those_of_models_saved_before_the_support_package():
    # A `.keras` file names its custom objects by these strings; runs saved before the
    # machinery moved into siamese_support name them so, and must still reload.
    names = [
        keras.saving.get_registered_name(item)
        for item in (mnist_siamese.EuclideanDistance, mnist_siamese.ContrastiveLoss)
    ]
    names.append(keras.saving.get_registered_name(mnist_siamese.accuracy))
    assert names == [
        "mnist_siamese>EuclideanDistance",
        "mnist_siamese>ContrastiveLoss",
        "mnist_siamese>accuracy",
    ]


@pytest.mark.parametrize(
    "layout",
    [
        lambda a: a / 255.0,  # float64 fractions, the common float layout
        lambda a: (a / np.float32(255)).astype(np.float32),
        lambda a: a.astype(np.float32),  # float pixel values 0-255
        lambda a: a.astype(np.int64),
        lambda a: a.astype(np.uint16),
    ],
    ids=["float64-fractions", "float32-fractions", "float32-pixels", "int64", "uint16"],
)
def test_other_numeric_layouts_give_the_same_pixels(tmp_path, tiny, layout, capsys):
    arrays = dict(tiny)
    arrays["x_train"], arrays["x_test"] = layout(tiny["x_train"]), layout(tiny["x_test"])
    np.savez(tmp_path / "other.npz", **arrays)
    (x_train, _), (x_test, _) = mnist_data.load_mnist(tmp_path / "other.npz")
    assert x_train.dtype == np.uint8 and x_test.dtype == np.uint8
    np.testing.assert_array_equal(x_train, tiny["x_train"])
    np.testing.assert_array_equal(x_test, tiny["x_test"])
    # The scaling it assumed is said, in one line.
    said = capsys.readouterr().out.strip().splitlines()
    assert len(said) == 1 and "read as pixel values 0-255" in said[0], said


def test_uint8_images_are_read_silently(tiny, capsys):
    mnist_data.load_mnist(FIXTURE)
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize(
    "change, hint",
    [
        ({"x_train": "nan"}, "x_train holds NaN or infinite values"),
        ({"x_test": "inf"}, "x_test holds NaN or infinite values"),
        ({"x_train": "fractions"}, "x_train looks scaled to 0-1 and x_test to 0-255"),
        ({"x_test": "zeros"}, "x_test is all zeros"),
        ({"x_test": "negative"}, "found values from -1"),
        ({"x_train": "text"}, "not pixel values"),
    ],
    ids=lambda value: value if isinstance(value, str) else next(iter(value.values())),
)
def test_ambiguous_or_broken_numbers_are_refused(tmp_path, tiny, change, hint):
    arrays = dict(tiny)
    ((name, how),) = change.items()
    images = tiny[name].astype(np.float32)
    if how == "nan":
        images = images / 255
        images[7, 3, 3] = np.nan
        arrays["x_test"] = tiny["x_test"] / 255
    elif how == "inf":
        images[2, 0, 0] = np.inf
    elif how == "fractions":
        images = images / 255
    elif how == "zeros":
        images = np.zeros_like(images)
    elif how == "negative":
        images = tiny[name].astype(np.int16) - 1
    elif how == "text":
        images = np.full(tiny[name].shape, "x")
    arrays[name] = images
    np.savez(tmp_path / "odd.npz", **arrays)
    with pytest.raises(ValueError, match=re.escape(hint)):
        mnist_data.load_mnist(tmp_path / "odd.npz")


@pytest.mark.parametrize(("process_count", "device_count"), [(1, 1), (2, 2), (3, 3), (1, 4)])
def test_pair_batches_shares_cover_every_pair_once_per_epoch(process_count, device_count):
    # Image i holds the value i, so each gathered image names its index.
    images = np.arange(41, dtype=np.uint8)[:, None, None] * np.ones((1, 2, 2), np.uint8)
    pairs = np.stack([np.arange(41), (np.arange(41) + 5) % 41], axis=1).astype(np.int32)
    labels = (np.arange(41) % 2).astype(np.float32)
    shares = [
        pipelines.PairBatches(images, pairs, labels, 12, 4, index, process_count, device_count)
        for index in range(process_count)
    ]
    orders = []
    for _ in range(2):
        seen = []
        for batch in range(len(shares[0])):
            parts = [share[batch] for share in shares]
            sizes = {len(part[1]) for part in parts}
            assert len(sizes) == 1  # every process feeds the same number of rows
            for (image_a, image_b), label, *weight in parts:
                weight = weight[0] if weight else np.ones(len(label), np.float32)
                assert weight.shape == (len(label),)
                firsts = np.rint(image_a[:, 0, 0] * 255).astype(int)
                for first, second, value, kept in zip(
                    firsts,
                    np.rint(image_b[:, 0, 0] * 255).astype(int),
                    label[:, 0],
                    weight,
                    strict=True,
                ):
                    assert second == (first + 5) % 41 and value == first % 2
                    if kept:
                        seen.append(int(first))
            # The global batch splits evenly over the devices.
            assert len(parts[0][1]) * process_count % device_count == 0
        assert sorted(seen) == list(range(41))  # each pair once, weighted 1
        orders.append(seen)
        for share in shares:
            share.on_epoch_end()
    assert orders[0] != orders[1]  # a new order every epoch, the same in every process
