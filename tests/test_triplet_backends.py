"""triplet_totally_looks_like.py under each Keras 3 backend: JAX and PyTorch without TensorFlow.

Each test starts the script, or a few lines that use it, in a subprocess with
`KERAS_BACKEND` set; lines meant for the backend this process already runs under run here
instead (`run_lines`), which spares a subprocess's imports. A backend that is not installed
skips its tests, with the reason: CI runs this module in its main environment (TensorFlow
and JAX) and again in an environment with JAX and without TensorFlow (`.ci/run`); PyTorch
is not a CI dependency.
"""

import json
import re
import sys
import textwrap

import helpers
import numpy as np
import pytest
from helpers import TRIPLET, describe, installed, needs
from keras import ops

import triplet_totally_looks_like as tll
from siamese_support import gallery, image_folders, mining, pillow_images, pipelines, synthetic

PROG = "triplet_totally_looks_like.py"


def run_under(backend, args, cwd, python_code=None, env=None, timeout=300):
    """`helpers.run` of the triplet script (or of `python_code`) with KERAS_BACKEND set."""
    environment = {"KERAS_BACKEND": backend, **(env or {})}
    return helpers.run(TRIPLET, args, cwd, python_code, environment, timeout)


def run_here(python_code, args, capsys, monkeypatch):
    """`python_code` in this process, with the `sys.argv` a subprocess would give it: stdout."""
    monkeypatch.setattr(sys, "argv", ["-c", str(TRIPLET), *map(str, args)])
    capsys.readouterr()
    exec(compile(python_code, "<python_code>", "exec"), {"__name__": "__main__"})
    return capsys.readouterr().out


def run_lines(backend, python_code, args, cwd, capsys, monkeypatch, timeout=180):
    """The stdout of `python_code` under `backend`: here if this process runs it, else a
    subprocess's (which must succeed)."""
    if backend == keras_backend():
        return run_here(python_code, args, capsys, monkeypatch)
    result = run_under(backend, args, cwd, python_code, timeout=timeout)
    assert result.returncode == 0, describe(result)
    return result.stdout


def keras_backend():
    """The Keras backend of this process."""
    return tll.keras.backend.backend()


# ---------------------------------------------------------------------------
# The script: training, compare and search
# ---------------------------------------------------------------------------


@pytest.mark.slow
@needs("torch")
def test_dry_run_under_pytorch(tmp_path):
    result = run_under("torch", ["--dry-run", "--no-plots"], tmp_path)
    assert result.returncode == 0, describe(result)
    assert re.fullmatch(r"Backend: torch\. Device: (CPU|GPU)", result.stdout.splitlines()[0])
    output_dir = tmp_path / "runs" / "triplet_totally_looks_like_dry_run"
    metrics = json.loads((output_dir / "metrics.json").read_text())
    assert metrics["epochs"] == 1 and 0.5 <= metrics["triplet_accuracy"] <= 1.0, metrics
    # compare reads and embeds with the same code as under JAX (see its test).
    image = synthetic.make_synthetic_dataset(tmp_path / "pairs", pairs=1) / "left" / "00000.jpg"
    compared = run_under("torch", ["compare", image, image, "--run-dir", output_dir], tmp_path)
    assert compared.returncode == 0, describe(compared)
    assert "Squared distance: 0.0000" in compared.stdout, compared.stdout


@needs("jax")
@pytest.mark.parametrize(
    ("backend", "args", "hints"),
    [
        pytest.param(
            "jax",
            ["--distribute", "mirrored"],
            ["MirroredStrategy", "KERAS_BACKEND=tensorflow"],
            marks=pytest.mark.jax_only,
        ),
        ("tensorflow", ["--distribute", "multi-process"], ["KERAS_BACKEND=jax"]),
    ],
)
def test_an_option_of_another_backend_names_the_backend_it_needs(backend, args, hints, tmp_path):
    if not installed(backend):
        pytest.skip(f"not installed here: {backend}")
    result = run_under(backend, ["--dry-run", *args], tmp_path)
    helpers.assert_one_line_error(result, PROG, *hints)
    assert not (tmp_path / "runs").exists()  # refused before anything was written


# ---------------------------------------------------------------------------
# One loss on every backend: the tutorial's tape step and Keras's default step agree
# ---------------------------------------------------------------------------

# One SGD step of the script's SiameseModel on a small dense embedding with BatchNormalization,
# its weights set from NumPy, fed by the script's own input pipeline (`make_store_dataset`):
# prints the step's loss and the weights after it (BatchNormalization's moving statistics
# included), for each kind of negatives. argv: --distribute's value.
ONE_STEP = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import triplet_totally_looks_like as tll
    from triplet_totally_looks_like import keras
    from siamese_support import devices, stores

    placement = devices.choose_placement(sys.argv[2], 8)
    rng = np.random.default_rng(0)
    store = rng.normal(size=(24, 5)).astype("float32")  # anchors, positives, negatives
    triplets = tll.validation_triplet_indices(np.arange(16, 24))
    results = {"line": placement.line}
    for negatives in ("random", "semi-hard", "hard"):
        with placement.scope():
            inputs = keras.Input((5,))
            hidden = keras.layers.Dense(8, activation="tanh")(inputs)
            if sys.argv[3] == "batchnorm":
                hidden = keras.layers.BatchNormalization()(hidden)
            embedding = keras.Model(inputs, keras.layers.Dense(3)(hidden))
            weights = np.random.default_rng(1)
            for layer in embedding.layers:
                if isinstance(layer, keras.layers.Dense):
                    layer.set_weights([weights.normal(size=w.shape) for w in layer.get_weights()])
            siamese_network = tll.build_siamese_network(embedding)
            model = tll.SiameseModel(siamese_network, 0.5, negatives, placement.loss_shares)
            model.compile(keras.optimizers.SGD(0.5))
            dataset = stores.make_store_dataset(store, triplets, 8, placement.share)
            history = model.fit(dataset, epochs=1, shuffle=False, verbose=0)
        results[negatives] = {
            "loss": history.history["loss"][0],
            "weights": [np.asarray(w).tolist() for w in embedding.get_weights()],
        }
    print("RESULTS " + json.dumps(results))
    """
)


def one_step(backend, cwd, capsys, monkeypatch, distribute="none", layers="batchnorm"):
    args = [distribute, layers]
    stdout = run_lines(backend, ONE_STEP, args, cwd, capsys, monkeypatch)
    line = next(line for line in stdout.splitlines() if line.startswith("RESULTS "))
    return json.loads(line.removeprefix("RESULTS "))


@pytest.mark.slow
@needs("tensorflow")
@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_keras_default_step_computes_the_tape_steps_loss_and_update(
    backend, tmp_path, capsys, monkeypatch
):
    if not installed(backend):
        pytest.skip(f"not installed here: {backend}")
    tape = one_step("tensorflow", tmp_path, capsys, monkeypatch)
    default = one_step(backend, tmp_path, capsys, monkeypatch)
    assert default["line"].startswith(f"Backend: {backend}.")
    for negatives in ("random", "semi-hard", "hard"):
        assert tape[negatives]["loss"] > 0
        # float32 sums in another order: 3e-5 relative seen on a loss of 0.025 (PyTorch).
        expected = pytest.approx(tape[negatives]["loss"], rel=1e-5, abs=1e-5)
        assert default[negatives]["loss"] == expected, negatives
        # The same update, and the same moving statistics of BatchNormalization.
        for got, want in zip(
            default[negatives]["weights"], tape[negatives]["weights"], strict=True
        ):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=negatives)
    # Mining chooses other negatives than the dataset's: the losses differ.
    assert tape["hard"]["loss"] != pytest.approx(tape["random"]["loss"])


# ---------------------------------------------------------------------------
# A saved embedding model reloads under the other backend
# ---------------------------------------------------------------------------

# argv: a model file to load ("-": none), a model file to save ("-": none), the images file.
# Loading embeds the images with the loaded model; saving builds the script's embedding model
# (random weights, 32 x 32 images), saves it as a run does, and embeds them with it.
LOAD_AND_SAVE = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import triplet_totally_looks_like as tll
    from triplet_totally_looks_like import keras
    from siamese_support import run_folder

    load_file, save_file, images_file = sys.argv[2:5]
    images = np.load(images_file)
    results = {"backend": keras.backend.backend()}
    if load_file != "-":
        loaded = keras.saving.load_model(load_file)
        results["loaded"] = keras.ops.convert_to_numpy(loaded.predict(images, verbose=0)).tolist()
    if save_file != "-":
        keras.utils.set_random_seed(0)
        embedding = tll.build_embedding_network((32, 32), weights=None)
        run_folder.save_model(embedding, save_file)
        saved = embedding.predict(images, verbose=0)
        results["saved"] = keras.ops.convert_to_numpy(saved).tolist()
    print(json.dumps(results))
    """
)


@pytest.mark.slow
@needs("tensorflow", "jax")
def test_embedding_saved_under_one_backend_gives_the_same_embeddings_under_the_other(
    tmp_path, capsys, monkeypatch
):
    # TensorFlow saves; JAX loads that file and saves its own; TensorFlow loads JAX's. The
    # steps of this process's backend run here.
    images = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype("float32")
    np.save(tmp_path / "images.npy", images)
    steps = (("tensorflow", "-", "tf.keras"), ("jax", "tf.keras", "jax.keras"))
    steps += (("tensorflow", "jax.keras", "-"),)
    results = []
    for backend, load_file, save_file in steps:
        arguments = [
            name if name == "-" else tmp_path / name
            for name in (load_file, save_file, "images.npy")
        ]
        stdout = run_lines(backend, LOAD_AND_SAVE, arguments, tmp_path, capsys, monkeypatch)
        results.append(json.loads(stdout.strip().splitlines()[-1]))
        assert results[-1]["backend"] == backend
    for saved, loaded in ((results[0], results[1]), (results[1], results[2])):
        expected = np.array(saved["saved"])
        assert expected.shape == (4, 256) and np.ptp(expected) > 0
        np.testing.assert_allclose(loaded["loaded"], expected, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------
# The pieces, in this process: bad files, TripletBatches and mining in shares
# ---------------------------------------------------------------------------


def test_files_that_are_no_images_are_found_and_named_under_every_backend(tmp_path):
    # The script's decoder: TensorFlow's under TensorFlow, Pillow's under JAX and PyTorch.
    good = synthetic.make_synthetic_dataset(tmp_path / "pairs", pairs=1) / "left" / "00000.jpg"
    (tmp_path / "notes.jpg").write_text("not an image")
    (tmp_path / "cut.jpg").write_bytes(good.read_bytes()[:200])
    files = [str(good), str(tmp_path / "notes.jpg"), str(tmp_path / "cut.jpg")]
    unreadable = image_folders.find_unreadable_images(files, tll.decode_image)
    assert sorted(unreadable) == sorted(files[1:]), unreadable
    assert all(reason and "\n" not in reason for reason in unreadable.values())
    # compare and search: one clear error (the script prints it in one line, exit code 2).
    for name in files[1:]:
        with pytest.raises(ValueError, match="not an image the training could read"):
            gallery.read_image(name, lambda path: tll.preprocess_image(path, (32, 32)))
    image = gallery.read_image(good, lambda path: pillow_images.read_image(path, (32, 32)))
    assert image.shape == (32, 32, 3) and image.dtype == np.float32


def _epoch_triplets(pair_count):
    """Triplets like the script's: every pair once an epoch, in a new order, negative i + 1."""

    def triplets(epoch):
        order = np.random.default_rng([3, epoch]).permutation(pair_count)
        return order, order + pair_count, (order + 1) % pair_count

    return triplets


@pytest.mark.parametrize(("process_count", "device_count"), [(1, 1), (2, 2), (1, 4), (3, 3)])
def test_triplet_batches_share_every_global_batch_between_processes(process_count, device_count):
    pair_count = 41
    store = np.arange(2 * pair_count, dtype=np.float32)[:, None]  # row i holds i
    triplets = _epoch_triplets(pair_count)
    shares = [
        pipelines.TripletBatches(store, triplets, 12, index, process_count, device_count)
        for index in range(process_count)
    ]
    orders = []
    for _ in range(2):
        seen = []
        for batch in range(len(shares[0])):
            parts = [share[batch] for share in shares]
            assert all(len(part) == 1 for part in parts)  # ((anchor, positive, negative),)
            sizes = {len(part[0][0]) for part in parts}
            assert len(sizes) == 1 and sizes.pop() * process_count % device_count == 0
            for ((anchor, positive, negative),) in parts:
                assert (positive[:, 0] == anchor[:, 0] + pair_count).all()
                assert (negative[:, 0] == (anchor[:, 0] + 1) % pair_count).all()
                seen += anchor[:, 0].astype(int).tolist()
        # Every pair once an epoch; where the last batch does not split over the devices,
        # fewer than `device_count` pairs sit the epoch out.
        assert len(seen) == len(set(seen)) and pair_count - len(seen) < device_count
        orders.append(seen)
        for share in shares:
            share.on_epoch_end()
    assert orders[0] != orders[1]  # a new order every epoch, the same in every process


def test_fixed_triplet_batches_are_padded_with_zero_weights_never_cut():
    pair_count = 11
    store = np.arange(2 * pair_count, dtype=np.float32)[:, None]
    fixed = (np.arange(pair_count), np.arange(pair_count) + pair_count, np.zeros(pair_count, int))
    shares = [
        pipelines.TripletBatches(store, lambda epoch: fixed, 8, index, 2, 2, pad=True)
        for index in range(2)
    ]
    assert len(shares[0]) == 2
    weighted = []
    for batch in range(2):
        for share in shares:
            part = share[batch]
            (anchor, _, _), *rest = part
            weights = rest[1] if rest else np.ones(len(anchor), np.float32)
            weighted += [
                int(row) for row, weight in zip(anchor[:, 0], weights, strict=True) if weight
            ]
    assert sorted(weighted) == list(range(pair_count))  # each validation triplet counts once


@pytest.mark.parametrize("strategy", ["semi-hard", "hard"])
def test_mining_in_groups_mines_each_share_on_its_own(strategy):
    rng = np.random.default_rng(4)
    anchors = rng.normal(size=(8, 3)).astype(np.float32)
    positives = (anchors + rng.normal(scale=0.7, size=(8, 3))).astype(np.float32)
    tensors = ops.convert_to_tensor(anchors), ops.convert_to_tensor(positives)
    grouped, found = mining.mine_negatives(*tensors, strategy, groups=2)
    halves = [
        mining.mine_negatives(*(tensor[part] for tensor in tensors), strategy)[0]
        for part in (slice(0, 4), slice(4, 8))
    ]
    expected = np.concatenate([ops.convert_to_numpy(half) for half in halves])
    grouped = ops.convert_to_numpy(grouped)
    np.testing.assert_array_equal(grouped, expected)
    assert ops.convert_to_numpy(found).all()
    # Each negative comes from its own half of the batch.
    for row, negative in enumerate(grouped):
        half = slice(0, 4) if row < 4 else slice(4, 8)
        candidates = np.concatenate([anchors[half], positives[half]])
        assert any(np.array_equal(negative, candidate) for candidate in candidates)
