"""triplet_totally_looks_like.py under JAX, in a process where TensorFlow cannot be imported.

What JAX users run: the dry run, `compare` and `search`, all without TensorFlow; and Keras's
`DataParallel` over two devices, under which the loss sees the whole batch and must mine
each device's share on its own. CI runs this module in its environment with JAX and without
TensorFlow (`.ci/run`), where `compare` and `search` run in the test process;
test_triplet_backends.py compares JAX with TensorFlow and PyTorch.
"""

import json
import re
import textwrap

import helpers
import keras
import numpy as np
import pytest
from helpers import TRIPLET, describe

from siamese_support import synthetic

pytest.importorskip("jax", reason="these tests run the script under JAX (requirements-jax.txt)")


def run_under_jax(args, cwd, python_code=helpers.RUN_WITHOUT_TENSORFLOW, env=None):
    """`helpers.run` of the triplet script (or of `python_code`) with KERAS_BACKEND=jax."""
    return helpers.run(TRIPLET, args, cwd, python_code, {"KERAS_BACKEND": "jax", **(env or {})})


def command_under_jax(args, cwd, capsys):
    """`compare` or `search` under JAX without TensorFlow, as a finished process.

    Where TensorFlow is not installed and Keras runs JAX (CI's JAX environment), `main()`
    runs in this process, which spares a process's imports and the model's compiles; else
    a subprocess, with TensorFlow blocked.
    """
    if helpers.installed("tensorflow") or keras.backend.backend() != "jax":
        return run_under_jax(args, cwd)
    import triplet_totally_looks_like

    return helpers.run_main(triplet_totally_looks_like, args, cwd, capsys)


@pytest.fixture(scope="module")
def jax_run(tmp_path_factory):
    """The dry run under JAX, with TensorFlow blocked: `(folder, finished process)`."""
    cwd = tmp_path_factory.mktemp("jax")
    result = run_under_jax(["--dry-run"], cwd)
    return cwd / "runs" / "triplet_totally_looks_like_dry_run", result


@pytest.mark.slow
def test_dry_run_under_jax_needs_no_tensorflow(jax_run):
    output_dir, result = jax_run
    assert result.returncode == 0, describe(result)
    assert result.stdout.splitlines()[0] == "Backend: jax. Device: CPU"
    assert result.stderr.strip() == "", result.stderr
    metrics = json.loads((output_dir / "metrics.json").read_text())
    assert metrics["epochs"] == 1 and metrics["replicas"] == 1, metrics
    assert metrics["training_pairs"] == 38 and metrics["validation_pairs"] == 10
    assert 0.5 <= metrics["triplet_accuracy"] <= 1.0, metrics
    for name in ("embedding.keras", "history.csv", "similarities.csv", "triplets.png", "loss.png"):
        assert (output_dir / name).is_file(), name
    history = (output_dir / "history.csv").read_text().splitlines()
    assert history[0] == "epoch,loss,val_loss" and len(history) == 2
    assert np.isfinite([float(value) for value in history[1].split(",")]).all(), history


@pytest.mark.slow
def test_compare_and_search_under_jax_need_no_tensorflow(jax_run, tmp_path, capsys):
    output_dir, result = jax_run
    assert result.returncode == 0, describe(result)
    gallery = synthetic.make_synthetic_dataset(tmp_path / "gallery", pairs=8, image_size=80)
    query = gallery / "left" / "00000.jpg"
    common = ["--run-dir", output_dir]
    search = ["search", query, "--gallery", gallery / "right", "-k", "3", *common]
    searched = command_under_jax(search, tmp_path, capsys)
    assert searched.returncode == 0, describe(searched)
    ranking = [line for line in searched.stdout.splitlines() if re.match(r"\s+\d\. ", line)]
    assert len(ranking) == 3, searched.stdout
    assert (output_dir / "search.png").is_file()
    compare = ["compare", query, gallery / "right" / "00000.jpg", *common]
    compared = command_under_jax(compare, tmp_path, capsys)
    assert compared.returncode == 0, describe(compared)
    assert re.search(r"^Squared distance: \d+\.\d{4}$", compared.stdout, re.M), compared.stdout
    # (A file that is no image: test_triplet_backends.py, in its process.)


# The CPU split into two devices, Keras's DataParallel over them: one SGD step of the script's
# SiameseModel on a small dense embedding, fed by the script's own input pipeline, with random
# and with hard negatives; and the losses those should have, computed by hand from the same
# weights: random negatives' over the whole batch, hard ones mined in each half (a device's
# share) and averaged, or mined over the whole batch.
DATA_PARALLEL = textwrap.dedent(
    """
    import json
    import numpy as np
    import triplet_totally_looks_like as tll
    from triplet_totally_looks_like import keras, ops
    from siamese_support import devices, mining, stores

    placement = devices.choose_placement("auto", 8)
    store = np.random.default_rng(0).normal(size=(24, 5)).astype("float32")
    triplets = tll.validation_triplet_indices(np.arange(16, 24))

    def dense_embedding():
        inputs = keras.Input((5,))
        hidden = keras.layers.Dense(8, activation="tanh")(inputs)
        embedding = keras.Model(inputs, keras.layers.Dense(3)(hidden))
        weights = np.random.default_rng(1)
        for layer in embedding.layers:
            if isinstance(layer, keras.layers.Dense):
                layer.set_weights([weights.normal(size=w.shape) for w in layer.get_weights()])
        return embedding

    def loss(embedding, rows, negatives):
        anchors, positives = embedding(store[rows]), embedding(store[rows + 8])
        if negatives == "random":
            chosen = embedding(store[rows + 16])
        else:
            chosen, _ = mining.mine_negatives(anchors, positives, negatives)
        distances = tll.DistanceLayer()(anchors, positives, chosen)
        return float(ops.mean(tll.triplet_loss(*distances, 0.5)))

    reference, rows = dense_embedding(), np.arange(8)
    results = {"line": placement.line, "random_whole": loss(reference, rows, "random")}
    results["hard_whole"] = loss(reference, rows, "hard")
    halves = [loss(reference, half, "hard") for half in (rows[:4], rows[4:])]
    results["hard_per_half"] = sum(halves) / 2
    for negatives in ("random", "hard"):
        with placement.scope():
            embedding = dense_embedding()
            network = tll.build_siamese_network(embedding)
            model = tll.SiameseModel(network, 0.5, negatives, placement.loss_shares)
            model.compile(keras.optimizers.SGD(0.5))
            dataset = stores.make_store_dataset(store, triplets, 8, placement.share)
            history = model.fit(dataset, epochs=1, shuffle=False, verbose=0)
        results[negatives] = history.history["loss"][0]
    print("RESULTS " + json.dumps(results))
    """
)


@pytest.mark.slow
def test_under_data_parallel_each_device_mines_in_its_own_share(tmp_path):
    split = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    result = run_under_jax([], tmp_path, DATA_PARALLEL, split)
    assert result.returncode == 0, describe(result)
    line = next(line for line in result.stdout.splitlines() if line.startswith("RESULTS "))
    results = json.loads(line.removeprefix("RESULTS "))
    assert results["line"] == "Backend: jax. Device: CPU, DataParallel over 2 devices"
    assert results["random"] == pytest.approx(results["random_whole"], rel=1e-5)
    assert results["hard"] == pytest.approx(results["hard_per_half"], rel=1e-5)
    # Mining over the whole batch chooses otherwise, or the check would prove nothing.
    assert results["hard_whole"] != pytest.approx(results["hard_per_half"], rel=1e-3)
