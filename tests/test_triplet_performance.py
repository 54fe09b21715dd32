"""The triplet script's fast paths: decode-once stores, cached trunk features, mixed
precision, XLA and tf.distribute, each checked against the plain path on CPU."""

import argparse
import csv
import json
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import triplet_totally_looks_like as tll  # noqa: E402
from triplet_totally_looks_like import keras, ops, tf  # noqa: E402

SIZE = 64  # conv5_block1_out is 2 x 2 x 2048 here: small, but more than one position


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pairs")
    return tll.make_synthetic_dataset(folder, pairs=12, image_size=80, seed=3)


@pytest.fixture(scope="module")
def image_files(pairs_dir):
    anchors, positives = tll.find_image_pairs(pairs_dir)
    return anchors + positives


@pytest.fixture()
def mixed_precision():
    """Train under the mixed_float16 policy, and restore the previous policy afterwards."""
    previous = keras.mixed_precision.dtype_policy()
    keras.mixed_precision.set_global_policy("mixed_float16")
    yield
    keras.mixed_precision.set_global_policy(previous)


# ---------------------------------------------------------------------------
# Stores: decode once, in memory or on disk
# ---------------------------------------------------------------------------


def test_a_store_too_large_for_its_budget_is_a_file_on_disk(tmp_path):
    in_memory = tll.new_store((3, 4), np.uint8, tmp_path, memory_budget=12)
    on_disk = tll.new_store((3, 4), np.uint8, tmp_path, memory_budget=11)
    assert not isinstance(in_memory, np.memmap)
    assert isinstance(on_disk, np.memmap)
    assert [path.suffix for path in tmp_path.iterdir()] == [".npy"]
    with pytest.raises(ValueError, match="does not fit in memory"):
        tll.new_store((3, 4), np.uint8, None, memory_budget=0)


def test_decode_images_once_keeps_the_pixels_the_example_computes(image_files):
    store = tll.decode_images_once(image_files, (SIZE, SIZE), batch_size=5)
    assert store.dtype == np.float32 and store.shape == (len(image_files), SIZE, SIZE, 3)
    for row in (0, 7, len(image_files) - 1):
        expected = tll.preprocess_image(image_files[row], (SIZE, SIZE)).numpy()
        np.testing.assert_array_equal(store[row], expected)


def test_store_batches_are_the_indexed_rows_from_memory_or_disk(tmp_path, image_files):
    in_memory = tll.decode_images_once(image_files, (SIZE, SIZE))
    on_disk = tll.new_store(in_memory.shape, np.float32, tmp_path, memory_budget=0)
    on_disk[:] = in_memory
    indices = tll.validation_triplet_indices([3, 0, 1, 2])
    for store in (in_memory, on_disk):
        anchor, positive, negative = next(iter(tll.make_store_dataset(store, indices, 4)))
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
    dataset = tll.make_store_dataset(np.zeros((80, 8), np.float32), indices, 8)
    assert tll.pipeline_throughput(dataset, batches=3) > 0


def test_store_batches_run_without_autotuning():
    indices = tll.validation_triplet_indices(np.zeros(40, np.int64))
    dataset = tll.make_store_dataset(np.zeros((80, 8), np.float32), indices, 8)
    assert dataset.options().autotune.enabled is False
    assert indices.options().autotune.enabled is not False
    # Turning autotuning off changes neither the batches nor their order.
    store = np.arange(80 * 8, dtype=np.float32).reshape(80, 8)
    untuned = tll.make_store_dataset(store, indices, 8)
    tuned = untuned.with_options(_autotuned())
    assert tuned.options().autotune.enabled is True
    for first, second in zip(untuned, tuned, strict=True):
        for left, right in zip(first, second, strict=True):
            np.testing.assert_array_equal(left.numpy(), right.numpy())


def _autotuned():
    options = tf.data.Options()
    options.autotune.enabled = True
    return options


# ---------------------------------------------------------------------------
# Cached features: the same loss and gradients as the whole network
# ---------------------------------------------------------------------------


def _loss_and_gradients(siamese_model, batch, weights):
    with tf.GradientTape() as tape:
        loss = siamese_model._compute_triplet_loss(batch, training=True)
    return float(loss), [ops.convert_to_numpy(g) for g in tape.gradient(loss, weights)]


def test_cached_features_give_the_same_loss_and_gradients(image_files):
    keras.utils.set_random_seed(0)
    embedding = tll.build_embedding_network((SIZE, SIZE), weights=None)
    trunk, tail = tll.split_embedding_network(embedding)
    images = tll.decode_images_once(image_files, (SIZE, SIZE))
    features = tll.compute_trunk_features(trunk, image_files, (SIZE, SIZE), batch_size=5)
    assert features.dtype == np.float32 and features.shape[1:] == (2, 2, 2048)

    pair_count = len(image_files) // 2
    negatives = tll.choose_negatives(pair_count, rng=1)
    image_batch = next(
        iter(tll.make_store_dataset(images, tll.validation_triplet_indices(negatives), 8))
    )
    feature_batch = next(
        iter(tll.make_store_dataset(features, tll.validation_triplet_indices(negatives), 8))
    )

    uncached = tll.SiameseModel(tll.build_siamese_network(embedding))
    cached = tll.SiameseModel(tll.build_siamese_network(tail))
    weights = embedding.trainable_weights
    assert {id(w) for w in tail.trainable_weights} == {id(w) for w in weights}
    loss, gradients = _loss_and_gradients(uncached, image_batch, weights)
    cached_loss, cached_gradients = _loss_and_gradients(cached, feature_batch, weights)

    assert loss > 0
    assert abs(cached_loss - loss) / loss <= 1e-3
    scale = max(np.max(np.abs(gradient)) for gradient in gradients)
    for weight, gradient, cached_gradient in zip(weights, gradients, cached_gradients, strict=True):
        np.testing.assert_allclose(
            cached_gradient, gradient, rtol=1e-3, atol=1e-5 * scale, err_msg=weight.path
        )


def _run_script(arguments):
    assert tll.main(arguments) == 0


def test_training_on_cached_features_matches_training_on_images(tmp_path, pairs_dir):
    common = ["--data-dir", str(pairs_dir), "--image-size", "32", "--batch-size", "4"]
    common += ["--epochs", "2", "--weights", "none", "--no-plots", "--seed", "5"]
    _run_script([*common, "--output-dir", str(tmp_path / "cached")])
    _run_script([*common, "--output-dir", str(tmp_path / "images"), "--no-cache-features"])
    cached = json.loads((tmp_path / "cached" / "metrics.json").read_text())
    images = json.loads((tmp_path / "images" / "metrics.json").read_text())
    assert cached["cache_features"] is True and images["cache_features"] is False
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


def test_mixed_precision_computes_in_float16_and_keeps_distances_and_loss_in_float32(
    mixed_precision, image_files
):
    keras.utils.set_random_seed(0)
    embedding = tll.build_embedding_network((32, 32), weights=None)
    trunk, tail = tll.split_embedding_network(embedding)
    images = tll.decode_images_once(image_files[:8], (32, 32))
    features = tll.compute_trunk_features(trunk, image_files[:8], (32, 32))
    assert features.dtype == np.float16  # the cache holds what the trunk computes
    assert embedding.get_layer("resnet50").compute_dtype == "float16"
    assert all(weight.dtype == "float32" for weight in embedding.weights)
    assert embedding(images[:2].astype("float32")).dtype == "float32"

    siamese_model = tll.SiameseModel(tll.build_siamese_network(tail))
    siamese_model.compile(optimizer=keras.optimizers.Adam(1e-3))
    assert isinstance(siamese_model.optimizer, keras.optimizers.LossScaleOptimizer)
    # Each negative is its anchor: every triplet violates the margin, the loss is positive.
    batch = tuple(tf.constant(features[rows]) for rows in ([0, 1], [4, 5], [0, 1]))
    ap_distance, an_distance = siamese_model(batch)
    assert ap_distance.dtype == an_distance.dtype == "float32"
    before = [np.array(weight.numpy()) for weight in tail.trainable_weights]
    logs = siamese_model.train_step(batch)
    assert logs["loss"].dtype == "float32" and 0 < float(logs["loss"]) < np.inf
    # The loss scale starts at 2**15 and is halved on every step whose float16 gradients
    # overflow, which is skipped; with random weights the loss is in the hundreds, so it
    # takes some twenty steps before the weights move.
    for _ in range(60):
        siamese_model.train_step(batch)
        after = [weight.numpy() for weight in tail.trainable_weights]
        if any(not np.array_equal(b, a) for b, a in zip(before, after, strict=True)):
            break
    else:
        pytest.fail("60 steps under mixed precision left every weight unchanged")
    assert int(siamese_model.optimizer.iterations) >= 1
    assert all(weight.dtype == "float32" for weight in tail.trainable_weights)


def test_the_mixed_precision_flag_sets_the_policy_for_the_run_only(tmp_path, pairs_dir):
    arguments = ["--data-dir", str(pairs_dir), "--image-size", "32", "--batch-size", "4"]
    arguments += ["--epochs", "1", "--weights", "none", "--no-plots", "--mixed-precision"]
    _run_script([*arguments, "--output-dir", str(tmp_path)])
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["mixed_precision"] is True
    saved = keras.saving.load_model(tmp_path / "embedding.keras")
    assert saved.get_layer("resnet50").get_layer("conv1_conv").compute_dtype == "float16"
    assert keras.mixed_precision.dtype_policy().name == "float32"


def test_mixed_precision_is_on_by_default_only_with_a_gpu():
    args = tll.resolve_settings(tll.build_argument_parser().parse_args(["--dry-run"]))
    assert args.mixed_precision is bool(tf.config.list_physical_devices("GPU"))
    args = tll.build_argument_parser().parse_args(["--no-mixed-precision", "--jit-compile"])
    assert args.mixed_precision is False and args.jit_compile is True


def test_an_xla_compiled_step_gives_the_same_loss(image_files):
    losses = []
    for jit_compile in (False, True):
        keras.utils.set_random_seed(0)
        embedding = tll.build_embedding_network((32, 32), weights=None)
        trunk, tail = tll.split_embedding_network(embedding)
        features = tll.compute_trunk_features(trunk, image_files, (32, 32))
        # Each anchor is its own negative: the loss is positive.
        anchors_as_negatives = np.arange(len(image_files) // 2)
        dataset = tll.make_store_dataset(
            features, tll.validation_triplet_indices(anchors_as_negatives), 4
        )
        siamese_model = tll.SiameseModel(tll.build_siamese_network(tail))
        settings = argparse.Namespace(learning_rate=1e-3, epochs=1, jit_compile=jit_compile)
        before = [np.array(weight.numpy()) for weight in tail.trainable_weights]
        # One step: its loss is computed before the update, from the same weights. (Over
        # more steps Adam turns rounding noise in near-zero gradients into visible changes.)
        history = tll.train(siamese_model, dataset.take(1), dataset.take(1), settings)
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
sys.path.insert(0, sys.argv[1])
import triplet_totally_looks_like as tll
from triplet_totally_looks_like import keras
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
        strategy, line = tll.choose_strategy(name)
        with strategy.scope():
            keras.utils.set_random_seed(0)
            inputs = keras.Input((5,))
            embedding = keras.Model(inputs, keras.layers.Dense(3)(inputs))
            siamese_model = tll.SiameseModel(tll.build_siamese_network(embedding))
            siamese_model.compile(optimizer=keras.optimizers.SGD(0.5))
        siamese_model.fit(tll.tf.data.Dataset.from_tensors(batch), epochs=1, verbose=0)
        results[name] = {"line": line, "weights": [w.numpy().tolist() for w in embedding.weights]}
    print("RESULTS " + json.dumps(results))
    """
)

# The script itself. TensorFlow's collectives do not survive a second MirroredStrategy
# in one process, so every run gets its own.
SCRIPT_RUNNER = SPLIT_CPU + "sys.exit(tll.main(sys.argv[2:]))\n"


def _python(code, *arguments):
    result = subprocess.run(
        [sys.executable, "-c", code, str(REPO), *arguments],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_mirrored_training_step_averages_the_loss_over_the_global_batch():
    output = _python(ONE_STEP_RUNNER)
    line = next(line for line in output.splitlines() if line.startswith("RESULTS "))
    results = json.loads(line.removeprefix("RESULTS "))
    assert results["none"]["line"] == "Device: CPU"
    assert results["mirrored"]["line"] == "Device: CPU, MirroredStrategy over 2 replicas"
    for single, mirrored in zip(
        results["none"]["weights"], results["mirrored"]["weights"], strict=True
    ):
        np.testing.assert_allclose(mirrored, single, rtol=1e-5, atol=1e-6)


def test_the_script_under_mirrored_strategy_gives_losses_close_to_one_device(tmp_path):
    # Pairs that barely look alike, so that many triplets violate the margin and the loss
    # is well above zero; 32 training pairs make two batches of 16, 8 per replica.
    pairs_dir = tll.make_synthetic_dataset(
        tmp_path / "pairs", pairs=40, image_size=48, seed=3, jitter=8.0
    )
    arguments = ["--data-dir", str(pairs_dir), "--image-size", "32", "--batch-size", "16"]
    arguments += ["--epochs", "1", "--weights", "none", "--no-plots"]
    rows = {}
    for name in ("none", "mirrored"):
        output_dir = tmp_path / name
        stdout = _python(
            SCRIPT_RUNNER, *arguments, "--output-dir", str(output_dir), "--distribute", name
        )
        metrics = json.loads((output_dir / "metrics.json").read_text())
        assert metrics["replicas"] == (2 if name == "mirrored" else 1), stdout
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
    arguments = ["--data-dir", str(pairs_dir), "--image-size", "32", "--batch-size", "4"]
    arguments += ["--weights", "none", "--no-plots", "--resume", "--output-dir", str(tmp_path)]
    assert tll.main(arguments) == 2
    error = capsys.readouterr().err
    assert len(error.strip().splitlines()) == 1
    assert "--image-size 48 -> 32" in error and "--cache-features False -> True" in error
    assert (tmp_path / "backup").exists()


def test_preparing_the_output_folder_removes_caches_of_a_killed_run(tmp_path):
    leftover = tmp_path / ".cache-abc123"
    leftover.mkdir()
    (leftover / "store-1.npy").write_bytes(b"\0" * 10)
    (tmp_path / "notes.txt").write_text("mine")
    tll.prepare_output_dir(tmp_path)
    assert not leftover.exists()
    assert (tmp_path / "notes.txt").read_text() == "mine"
