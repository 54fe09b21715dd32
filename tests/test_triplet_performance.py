"""The triplet script's fast paths: decode-once stores, cached trunk features, mixed
precision, XLA and tf.distribute, each checked against the plain path on CPU."""

import csv
import functools
import json
import textwrap

import helpers
import numpy as np
import pytest
from helpers import TRIPLET, describe

import triplet_totally_looks_like as tll
from siamese_support import command_line, image_folders, run_folder, stores, synthetic
from triplet_totally_looks_like import keras, ops, tf

SIZE = 64  # conv5_block1_out is 2 x 2 x 2048 here: small, but more than one position


def _loader(size):
    """The script's image loader at `size` x `size`, as it hands it to the stores."""
    return functools.partial(tll.preprocess_image, image_size=(size, size))


def _split(embedding):
    """The frozen trunk and the trainable tail of the script's embedding network."""
    return stores.split_at_layer(embedding, "resnet50", tll.first_trainable_layer)


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pairs")
    return synthetic.make_synthetic_dataset(folder, pairs=12, image_size=80, seed=3)


@pytest.fixture(scope="module")
def image_files(pairs_dir):
    anchors, positives = image_folders.find_image_pairs(pairs_dir)
    return anchors + positives


# ---------------------------------------------------------------------------
# Stores: decode once, in memory or on disk
# ---------------------------------------------------------------------------


def test_a_store_too_large_for_its_budget_is_a_file_on_disk(tmp_path):
    in_memory = stores.new_store((3, 4), np.uint8, tmp_path, memory_budget=12)
    on_disk = stores.new_store((3, 4), np.uint8, tmp_path, memory_budget=11)
    assert isinstance(in_memory, np.ndarray)
    assert isinstance(on_disk, stores.DiskStore)
    assert [path.suffix for path in tmp_path.iterdir()] == [".npy"]
    on_disk[1:] = np.arange(8).reshape(2, 4)
    np.testing.assert_array_equal(on_disk[[2, 1]], [[4, 5, 6, 7], [0, 1, 2, 3]])
    assert len(on_disk) == 3 and on_disk.nbytes == 12 and on_disk.dtype == np.uint8
    with pytest.raises(ValueError, match="does not fit in memory"):
        stores.new_store((3, 4), np.uint8, None, memory_budget=0)


def test_decode_images_once_keeps_the_pixels_the_example_computes(image_files):
    store = stores.decode_images_once(image_files, _loader(SIZE), (SIZE, SIZE), 5)
    assert store.dtype == np.float32 and store.shape == (len(image_files), SIZE, SIZE, 3)
    for row in (0, 7, len(image_files) - 1):
        expected = tll.preprocess_image(image_files[row], (SIZE, SIZE)).numpy()
        np.testing.assert_array_equal(store[row], expected)


def test_store_batches_are_the_indexed_rows_from_memory_or_disk(tmp_path, image_files):
    in_memory = stores.decode_images_once(image_files, _loader(SIZE), (SIZE, SIZE), 32)
    on_disk = stores.new_store(in_memory.shape, np.float32, tmp_path, memory_budget=0)
    on_disk[:] = in_memory
    indices = tll.validation_triplet_indices([3, 0, 1, 2])
    for store in (in_memory, on_disk):
        ((anchor, positive, negative),) = next(iter(stores.make_store_dataset(store, indices, 4)))
        assert anchor.dtype == tf.float32
        np.testing.assert_array_equal(anchor.numpy(), in_memory[:4])
        np.testing.assert_array_equal(positive.numpy(), in_memory[4:8])
        np.testing.assert_array_equal(negative.numpy(), in_memory[[3, 0, 1, 2]])


def test_training_triplet_indices_follow_the_file_name_triplets():
    anchors = [f"left/{index}.jpg" for index in range(6)]
    positives = [f"right/{index}.jpg" for index in range(6)]
    pool = anchors + positives
    by_index = list(tll.training_triplet_indices(6, seed=4).as_numpy_iterator())
    by_name = list(tll.training_triplets(anchors, positives, seed=4).as_numpy_iterator())
    assert [tuple(pool[i] for i in triplet) for triplet in by_index] == [
        tuple(name.decode() for name in triplet) for triplet in by_name
    ]


def test_pipeline_throughput_counts_triplets():
    indices = tll.validation_triplet_indices(np.zeros(40, np.int64))
    dataset = stores.make_store_dataset(np.zeros((80, 8), np.float32), indices, 8)
    assert stores.pipeline_throughput(dataset, batches=3) > 0


def test_store_batches_run_without_autotuning():
    indices = tll.validation_triplet_indices(np.zeros(40, np.int64))
    dataset = stores.make_store_dataset(np.zeros((80, 8), np.float32), indices, 8)
    assert dataset.options().autotune.enabled is False
    assert indices.options().autotune.enabled is not False


class _RowCounter:
    """A stand-in model that doubles its input and records how many rows each call read."""

    def __init__(self):
        self.rows_per_call = []

    def predict_on_batch(self, batch):
        self.rows_per_call.append(len(batch))
        return batch * 2


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_predict_rows_feeds_a_pytorch_model_a_few_rows_at_a_time(monkeypatch, backend):
    monkeypatch.setattr(stores, "keras_backend", lambda: backend)
    monkeypatch.setattr(stores, "torch_rows_at_once", 8)
    model = _RowCounter()
    batch = np.arange(20 * 3, dtype=np.float32).reshape(20, 3)
    np.testing.assert_array_equal(stores.predict_rows(model, batch), batch * 2)
    expected = [8, 8, 4] if backend == "torch" else [20]
    assert model.rows_per_call == expected


# ---------------------------------------------------------------------------
# Cached features: the same loss and gradients as the whole network
# ---------------------------------------------------------------------------


def _loss_and_gradients(siamese_model, batch, weights):
    with tf.GradientTape() as tape:
        loss = siamese_model._compute_triplet_loss(batch, training=True)
    return float(loss), [ops.convert_to_numpy(g) for g in tape.gradient(loss, weights)]


# Each weight's gradient through the cached features must be its gradient through the whole
# network up to rounding, compared by the relative norm of the difference, |g_cached - g| /
# |g|, rather than element by element (4 million float32 values in dense/kernel alone, some
# near zero, fail any element-wise tolerance on rounding). The two paths reach the trainable
# layers through differently batched convolutions, whose algorithms may round differently.
# Measured here in a scratch run: the two paths agreed exactly on this machine; cached
# features perturbed by 1, 8 and 64 float32 rounding steps (relative 2**-23, 2**-20 and
# 2**-17, more than two convolution algorithms differ by) moved the worst weight's gradient
# by up to 6e-5, 7.5e-3 and 1.7e-2 of its norm (two draws each). Real differences moved it
# by 1.0: the head's or the ResNet tail's BatchNormalization layers in inference mode, a
# tail without its last BatchNormalization. The bound sits between the two: three times the
# largest rounding effect measured, a twentieth of a real difference.
GRADIENT_BOUND = 5e-2
# Some gradients are zero in exact arithmetic: a bias followed by BatchNormalization (which
# subtracts it again), and the last layer's bias and the last BatchNormalization's beta
# (which shift all three embeddings alike, and distances ignore a shift). Computed, they
# are rounding noise, about 1e-9 of the largest gradient, and a relative difference means
# nothing there; they are checked to vanish in both paths instead.
VANISHING = 1e-6


def _gradient_differences(weights, gradients, other_gradients):
    """`(relative, vanishing)`: |other - g| / |g| by weight path, and the vanishing paths.

    A gradient vanishes when its norm is at most VANISHING times the largest gradient's;
    it must then vanish in `other_gradients` too, or it counts as a difference of 1.
    """
    largest = max(np.linalg.norm(gradient) for gradient in gradients)
    relative, vanishing = {}, []
    for weight, gradient, other in zip(weights, gradients, other_gradients, strict=True):
        if np.linalg.norm(gradient) > VANISHING * largest:
            difference = np.linalg.norm(other - gradient) / np.linalg.norm(gradient)
            relative[weight.path] = float(difference)
        elif np.linalg.norm(other) <= VANISHING * largest:
            vanishing.append(weight.path)
        else:
            relative[weight.path] = 1.0
    return relative, vanishing


@pytest.mark.slow
def test_cached_features_give_the_same_loss_and_gradients(image_files):
    keras.utils.set_random_seed(0)
    embedding = tll.build_embedding_network((SIZE, SIZE), weights=None)
    trunk, tail = _split(embedding)
    images = stores.decode_images_once(image_files, _loader(SIZE), (SIZE, SIZE), 32)
    features = stores.compute_trunk_features(trunk, image_files, _loader(SIZE), 5)
    assert features.dtype == np.float32 and features.shape[1:] == (2, 2, 2048)

    pair_count = len(image_files) // 2
    negatives = tll.choose_negatives(pair_count, rng=1)
    # A store's batch is ((anchors, positives, negatives),): the triplet is its one element.
    (image_batch,) = next(
        iter(stores.make_store_dataset(images, tll.validation_triplet_indices(negatives), 8))
    )
    (feature_batch,) = next(
        iter(stores.make_store_dataset(features, tll.validation_triplet_indices(negatives), 8))
    )

    uncached = tll.SiameseModel(tll.build_siamese_network(embedding))
    cached = tll.SiameseModel(tll.build_siamese_network(tail))
    weights = embedding.trainable_weights
    assert {id(w) for w in tail.trainable_weights} == {id(w) for w in weights}
    loss, gradients = _loss_and_gradients(uncached, image_batch, weights)
    cached_loss, cached_gradients = _loss_and_gradients(cached, feature_batch, weights)

    assert loss > 0
    assert abs(cached_loss - loss) / loss <= 1e-3
    relative, vanishing = _gradient_differences(weights, gradients, cached_gradients)
    # Only biases and betas vanish; every kernel and gamma is compared.
    assert all(path.endswith(("/bias", "/beta")) for path in vanishing), vanishing
    assert len(relative) > len(weights) // 2
    worst = max(relative, key=relative.get)
    assert relative[worst] <= GRADIENT_BOUND, (worst, relative[worst])


@pytest.mark.slow
def test_training_on_cached_features_matches_training_on_images(tmp_path, pairs_dir, capsys):
    common = ["--data-dir", pairs_dir, "--image-size", "32", "--batch-size", "4"]
    common += ["--epochs", "2", "--weights", "none", "--no-plots", "--seed", "5"]
    for extra in (["--output-dir", "cached"], ["--output-dir", "images", "--no-cache-features"]):
        result = helpers.run_main(tll, [*common, *extra], tmp_path, capsys)
        assert result.returncode == 0, describe(result)
    cached = json.loads((tmp_path / "cached" / "metrics.json").read_text())
    images = json.loads((tmp_path / "images" / "metrics.json").read_text())
    assert cached["cache_features"] is True and images["cache_features"] is False
    # Without --mixed-precision it is on only where TensorFlow sees a GPU.
    gpu = bool(tf.config.list_physical_devices("GPU"))
    assert cached["mixed_precision"] is gpu and images["mixed_precision"] is gpu
    history = {}
    for name in ("cached", "images"):
        lines = (tmp_path / name / "history.csv").read_text().splitlines()
        history[name] = [line.split(",") for line in lines[1:]]
    assert len(history["cached"]) == 2
    for cached_row, image_row in zip(history["cached"], history["images"], strict=True):
        for cached_value, image_value in zip(cached_row, image_row, strict=True):
            assert float(cached_value) == pytest.approx(float(image_value), rel=1e-3, abs=1e-6)
    assert cached["triplet_accuracy"] == images["triplet_accuracy"]
    assert cached["recall_at_1"] == images["recall_at_1"]
    # The saved model is the whole embedding network, which takes images.
    saved = keras.saving.load_model(tmp_path / "cached" / "embedding.keras")
    assert tuple(saved.input.shape[1:]) == (32, 32, 3)
    # No cache is left behind.
    assert not list((tmp_path / "cached").glob(".cache-*"))


# ---------------------------------------------------------------------------
# Mixed precision and XLA, as far as a CPU runs them
# ---------------------------------------------------------------------------


@pytest.mark.slow
def test_mixed_precision_computes_in_float16_and_keeps_distances_and_loss_in_float32(
    mixed_precision, image_files
):
    keras.utils.set_random_seed(0)
    embedding = tll.build_embedding_network((32, 32), weights=None)
    trunk, tail = _split(embedding)
    images = stores.decode_images_once(image_files[:8], _loader(32), (32, 32), 32)
    features = stores.compute_trunk_features(trunk, image_files[:8], _loader(32), 32)
    assert features.dtype == np.float16  # the cache holds what the trunk computes
    assert embedding.get_layer("resnet50").compute_dtype == "float16"
    assert all(weight.dtype == "float32" for weight in embedding.weights)
    assert embedding(images[:2].astype("float32")).dtype == "float32"

    siamese_model = tll.SiameseModel(tll.build_siamese_network(tail))
    siamese_model.compile(optimizer=keras.optimizers.Adam(1e-3))
    assert isinstance(siamese_model.optimizer, keras.optimizers.LossScaleOptimizer)
    # The loss scale starts at 2**15 and is halved on every step whose float16 gradients
    # overflow, which is skipped. With random weights the loss is in the hundreds, and the
    # gradients fit float16 only from 2**-11 on (measured: 26 skipped steps, 1.5 s each on a
    # CPU, which emulates float16). The scale starts at 2**-12, where the weights move in the
    # first steps; the loop still allows for steps to skip.
    siamese_model.optimizer.initial_scale = 2.0**-12
    # Each negative is its anchor: every triplet violates the margin, the loss is positive.
    batch = tuple(tf.constant(features[rows]) for rows in ([0, 1], [4, 5], [0, 1]))
    ap_distance, an_distance = siamese_model(batch)
    assert ap_distance.dtype == an_distance.dtype == "float32"
    before = [np.array(weight.numpy()) for weight in tail.trainable_weights]
    logs = siamese_model.train_step((batch,))
    assert logs["loss"].dtype == "float32" and 0 < float(logs["loss"]) < np.inf
    for _ in range(60):
        siamese_model.train_step((batch,))
        after = [weight.numpy() for weight in tail.trainable_weights]
        if any(not np.array_equal(b, a) for b, a in zip(before, after, strict=True)):
            break
    else:
        pytest.fail("60 steps under mixed precision left every weight unchanged")
    assert int(siamese_model.optimizer.iterations) >= 1
    assert all(weight.dtype == "float32" for weight in tail.trainable_weights)


@pytest.mark.slow
def test_the_mixed_precision_flag_sets_the_policy_for_the_run_only(tmp_path, pairs_dir, capsys):
    arguments = ["--data-dir", pairs_dir, "--image-size", "32", "--batch-size", "4"]
    arguments += ["--epochs", "1", "--weights", "none", "--no-plots", "--mixed-precision"]
    result = helpers.run_main(tll, [*arguments, "--output-dir", tmp_path], tmp_path, capsys)
    assert result.returncode == 0, describe(result)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["mixed_precision"] is True
    saved = keras.saving.load_model(tmp_path / "embedding.keras")
    assert saved.get_layer("resnet50").get_layer("conv1_conv").compute_dtype == "float16"
    assert keras.mixed_precision.dtype_policy().name == "float32"


@pytest.mark.slow
def test_an_xla_compiled_step_gives_the_same_loss(image_files):
    keras.utils.set_random_seed(0)
    embedding = tll.build_embedding_network((32, 32), weights=None)
    trunk, tail = _split(embedding)
    features = stores.compute_trunk_features(trunk, image_files, _loader(32), 32)
    # Each anchor is its own negative: the loss is positive.
    anchors_as_negatives = np.arange(len(image_files) // 2)
    dataset = stores.make_store_dataset(
        features, tll.validation_triplet_indices(anchors_as_negatives), 4
    )
    # One network for both steps (building ResNet50 costs seconds): each step starts from
    # the weights it was built with, trainable or not (the BatchNormalization statistics).
    built = tail.get_weights()
    losses = []
    for jit_compile in (False, True):
        keras.utils.set_random_seed(0)
        tail.set_weights(built)
        siamese_model = tll.SiameseModel(tll.build_siamese_network(tail))
        # Compiled as the script compiles it: Adam, and XLA on or off.
        siamese_model.compile(keras.optimizers.Adam(1e-3), jit_compile=jit_compile)
        before = [np.array(weight.numpy()) for weight in tail.trainable_weights]
        # One step: its loss is computed before the update, from the same weights. (Over
        # more steps Adam turns rounding noise in near-zero gradients into visible changes.)
        # No validation pass: the test step compiled by XLA too cost 5 s, and no check used it.
        history = siamese_model.fit(dataset.take(1), verbose=0)
        assert siamese_model.jit_compile is jit_compile
        after = [weight.numpy() for weight in tail.trainable_weights]
        assert any(not np.array_equal(b, a) for b, a in zip(before, after, strict=True))
        losses.append(history.history["loss"][0])
    assert losses[0] > 0
    assert losses[1] == pytest.approx(losses[0], rel=1e-3)


# ---------------------------------------------------------------------------
# tf.distribute.MirroredStrategy over two logical CPU devices, in a subprocess
# ---------------------------------------------------------------------------

SPLIT_CPU = """
import sys
import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import triplet_totally_looks_like as tll
from triplet_totally_looks_like import keras
from siamese_support import devices
"""

# One SGD step on a model without BatchNormalization, on one device and then mirrored over
# the two: the update must be the same (the loss averaged over the global batch).
ONE_STEP_RUNNER = SPLIT_CPU + textwrap.dedent(
    """
    import json
    import numpy as np

    results = {}
    rng = np.random.default_rng(0)
    batch = tuple(rng.normal(size=(8, 5)).astype("float32") for _ in range(3))
    for name in ("none", "mirrored"):
        strategy, line = devices.choose_strategy(name)
        with strategy.scope():
            keras.utils.set_random_seed(0)
            inputs = keras.Input((5,))
            embedding = keras.Model(inputs, keras.layers.Dense(3)(inputs))
            siamese_model = tll.SiameseModel(tll.build_siamese_network(embedding))
            siamese_model.compile(optimizer=keras.optimizers.SGD(0.5))
        siamese_model.fit(tll.tf.data.Dataset.from_tensors((batch,)), epochs=1, verbose=0)
        results[name] = {"line": line, "weights": [w.numpy().tolist() for w in embedding.weights]}
    print("RESULTS " + json.dumps(results))
    """
)

# The script itself, on one device and then mirrored, in one process: `main(ARGS)` with
# `--output-dir NAME --distribute NAME` for each. (TensorFlow's collectives do not survive a
# second MirroredStrategy in one process: one mirrored run per process.)
SCRIPT_RUNNER = SPLIT_CPU + textwrap.dedent(
    """
    for name in ("none", "mirrored"):
        code = tll.main([*sys.argv[2:], "--output-dir", name, "--distribute", name])
        if code:
            sys.exit(code)
    """
)


@pytest.mark.slow
def test_mirrored_training_step_averages_the_loss_over_the_global_batch(tmp_path):
    result = helpers.run(TRIPLET, [], tmp_path, python_code=ONE_STEP_RUNNER)
    assert result.returncode == 0, describe(result)
    line = next(line for line in result.stdout.splitlines() if line.startswith("RESULTS "))
    results = json.loads(line.removeprefix("RESULTS "))
    assert results["none"]["line"] == "Device: CPU"
    assert results["mirrored"]["line"] == "Device: CPU, MirroredStrategy over 2 replicas"
    for single, mirrored in zip(
        results["none"]["weights"], results["mirrored"]["weights"], strict=True
    ):
        np.testing.assert_allclose(mirrored, single, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_the_script_under_mirrored_strategy_gives_losses_close_to_one_device(tmp_path):
    # Pairs that barely look alike, so that many triplets violate the margin and the loss
    # is well above zero; 32 training pairs make two batches of 16, 8 per replica.
    pairs_dir = synthetic.make_synthetic_dataset(
        tmp_path / "pairs", pairs=40, image_size=48, seed=3, jitter=8.0
    )
    arguments = ["--data-dir", pairs_dir, "--image-size", "32", "--batch-size", "16"]
    arguments += ["--epochs", "1", "--weights", "none", "--no-plots"]
    result = helpers.run(TRIPLET, arguments, tmp_path, python_code=SCRIPT_RUNNER, timeout=600)
    assert result.returncode == 0, describe(result)
    rows = {}
    for name in ("none", "mirrored"):
        output_dir = tmp_path / name
        metrics = json.loads((output_dir / "metrics.json").read_text())
        assert metrics["replicas"] == (2 if name == "mirrored" else 1), result.stdout
        with open(output_dir / "history.csv", newline="") as stream:
            rows[name] = list(csv.DictReader(stream))
    assert len(rows["none"]) == len(rows["mirrored"]) == 1
    # BatchNormalization normalises each replica's half batch on its own, so the training
    # losses are close rather than equal; the validation loss (inference mode, after two
    # small steps) is closer. A loss summed over the replicas would be twice as large.
    for key, tolerance in (("loss", 0.2), ("val_loss", 0.05)):
        single, mirrored = float(rows["none"][0][key]), float(rows["mirrored"][0][key])
        assert single > 1.0, (key, single)
        assert abs(mirrored - single) <= tolerance * single, (key, single, mirrored)


# ---------------------------------------------------------------------------
# Resuming and leftovers
# ---------------------------------------------------------------------------


def test_resuming_with_other_settings_is_refused_in_one_line(tmp_path, pairs_dir, capsys):
    (tmp_path / "backup").mkdir()
    earlier = {"image_size": 48, "batch_size": 4, "margin": 0.5, "learning_rate": 0.0001}
    earlier |= {"weights": None, "cache_features": False, "mixed_precision": False}
    (tmp_path / "settings.json").write_text(json.dumps(earlier))
    arguments = ["--data-dir", pairs_dir, "--image-size", "32", "--batch-size", "4"]
    arguments += ["--weights", "none", "--no-plots", "--resume", "--output-dir", tmp_path]
    result = helpers.run_main(tll, arguments, tmp_path, capsys)
    hints = ("--image-size 48 -> 32", "--cache-features False -> True")
    helpers.assert_one_line_error(result, "triplet_totally_looks_like.py", *hints)
    assert (tmp_path / "backup").exists()


def test_preparing_the_output_folder_removes_caches_of_a_killed_run(tmp_path):
    leftover = tmp_path / ".cache-abc123"
    leftover.mkdir()
    (leftover / "store-1.npy").write_bytes(b"\0" * 10)
    (tmp_path / "notes.txt").write_text("mine")
    run_folder.prepare_output_dir(tmp_path, outputs=command_line.TRIPLET_OUTPUT_FILES)
    assert not leftover.exists()
    assert (tmp_path / "notes.txt").read_text() == "mine"
