"""What makes an epoch fast: steps per compiled call, data gathered on the device, one trace.

- `--steps-per-execution`: its default, what a run records, and its bad values (0, more
  than an epoch's steps, more than 1 where Keras runs one step per call), each one line on
  stderr and exit code 2, before any training.
- Data kept on the device (JAX on an accelerator): the batches gathered there are the NumPy
  batches, bit for bit, and a whole run trains the same with them; here, on a CPU, the
  device path is forced.
- `metrics.json`'s `epoch_seconds`, the callbacks that let Keras run batch hooks on its
  thread, and the epoch-split benchmark (no step traced again after the first epoch).
"""

import contextlib
import csv
import json
import pathlib
import re
import textwrap

import helpers
import keras
import numpy as np
import pytest
from helpers import FIXTURE, MNIST, REPOSITORY, TRIPLET

import mnist_siamese
from siamese_support import devices, pipelines, run_folder, stores

# The data of the MNIST runs; MNIST_RUN, for `main()` in this process, keeps its threads.
MNIST_DATA = ["--data", FIXTURE, "--limit", "600", "--no-plots"]
MNIST_RUN = [*MNIST_DATA, *helpers.same_threads()]

# Runs a script as `python SCRIPT ARGS` would, with the data kept "on the device" (JAX's CPU).
ON_DEVICE = textwrap.dedent(
    """
    import runpy, sys
    from siamese_support import pipelines

    pipelines.keeps_data_on_device = lambda nbytes, device_count=1: device_count == 1
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
    """
)


def read_history(output_dir):
    with open(pathlib.Path(output_dir) / "history.csv", newline="") as stream:
        return list(csv.DictReader(stream))


def read_json(path):
    return json.loads(pathlib.Path(path).read_text())


class FakePlacement:
    """A `devices.Placement` stand-in: only `scope` is read."""

    scope = staticmethod(contextlib.nullcontext)


# ---------------------------------------------------------------------------
# --steps-per-execution
# ---------------------------------------------------------------------------


def test_steps_per_execution_default_is_capped_by_the_epoch():
    choose = devices.choose_steps_per_execution
    placement = FakePlacement()
    assert choose(None, 32, 1000, 10, placement) == 32  # 100 steps an epoch
    assert choose(None, 32, 95, 10, placement) == 10  # an epoch of 10 steps
    assert choose(None, 32, 5, 10, placement) == 1
    assert choose(7, 32, 95, 10, placement) == 7
    assert choose(10, 32, 95, 10, placement) == 10  # the whole epoch in one call
    # A pair is (on a CPU, on an accelerator): this machine has no GPU.
    assert not devices.accelerator_visible()
    assert choose(None, (1, 8), 1000, 10, placement) == 1


def test_steps_per_execution_default_pair_picks_the_gpu_value_on_a_gpu(monkeypatch):
    monkeypatch.setattr(devices, "accelerator_visible", lambda: True)
    choose = devices.choose_steps_per_execution
    assert choose(None, (1, 8), 1000, 10, FakePlacement()) == 8
    assert choose(None, (1, 8), 50, 10, FakePlacement()) == 5  # capped by the epoch
    assert choose(3, (1, 8), 1000, 10, FakePlacement()) == 3  # asked for


def test_steps_per_execution_above_an_epoch_is_refused():
    with pytest.raises(ValueError, match=r"--steps-per-execution 11 is more than the 10 training"):
        devices.choose_steps_per_execution(11, 32, 95, 10, FakePlacement())
    with pytest.raises(ValueError, match=r"the 1 training step of an epoch"):
        devices.choose_steps_per_execution(2, 32, 3, 10, FakePlacement())


def test_steps_per_execution_is_one_where_keras_runs_one_step_per_call(monkeypatch):
    monkeypatch.setattr(devices, "keras_backend", lambda: "torch")
    choose = devices.choose_steps_per_execution
    assert choose(None, 32, 1000, 10, FakePlacement()) == 1
    assert choose(1, 32, 1000, 10, FakePlacement()) == 1
    with pytest.raises(ValueError, match="PyTorch backend runs one training step per call"):
        choose(4, 32, 1000, 10, FakePlacement())


@helpers.needs("tensorflow")
def test_steps_per_execution_under_mirrored_strategy():
    if keras.backend.backend() != "tensorflow":
        pytest.skip("MirroredStrategy is TensorFlow's")
    placement = devices.choose_placement("mirrored", 32)
    assert devices.choose_steps_per_execution(None, 32, 1000, 10, placement) == 1
    with pytest.raises(ValueError, match="MirroredStrategy runs one training step per call"):
        devices.choose_steps_per_execution(4, 32, 1000, 10, placement)


@pytest.mark.parametrize("script", [MNIST, TRIPLET], ids=["mnist", "triplet"])
def test_help_names_the_option_and_zero_is_refused_at_once(script, tmp_path):
    shown = helpers.run(script, ["--help"], tmp_path, python_code=helpers.RUN_WITHOUT_TENSORFLOW)
    assert shown.returncode == 0, helpers.describe(shown)
    assert "--steps-per-execution N" in shown.stdout
    default = "default 32" if script == MNIST else "default 1 on a CPU, 8 on a GPU"
    assert default in " ".join(shown.stdout.split()), shown.stdout
    for value in ("0", "-3", "two"):
        result = helpers.run(script, ["--steps-per-execution", value], tmp_path)
        helpers.assert_one_line_error(result, script.name, "--steps-per-execution")
    assert not (tmp_path / "runs").exists()


def test_mnist_steps_per_execution_above_an_epoch_is_one_line(capsys, tmp_path):
    # 600 images of each set make 8 training batches of 128 pairs.
    args = [*MNIST_RUN, "--steps-per-execution", "9", "--output-dir", tmp_path / "out"]
    result = helpers.run_main(mnist_siamese, args, tmp_path, capsys)
    line = helpers.assert_one_line_error(result, "mnist_siamese.py", "--steps-per-execution 9")
    assert "8 training steps of an epoch" in line
    assert not (tmp_path / "out").exists()  # refused before the run folder was made


@pytest.mark.slow
def test_triplet_steps_per_execution_above_an_epoch_is_one_line(tmp_path):
    # The dry run: 38 training pairs, batches of 32, 2 steps an epoch.
    args = ["--dry-run", "--steps-per-execution", "3", "--output-dir", tmp_path / "out"]
    result = helpers.run(TRIPLET, args, tmp_path)
    line = helpers.assert_one_line_error(result, TRIPLET.name, "--steps-per-execution 3")
    assert "2 training steps of an epoch" in line
    assert not (tmp_path / "out" / "settings.json").exists()


# ---------------------------------------------------------------------------
# Data gathered on the device
# ---------------------------------------------------------------------------


def test_the_pixel_table_gives_what_dividing_by_255_gives():
    # PairBatches reads p / 255 from a table (one pass, on the host and on the device).
    pixels = np.arange(256, dtype=np.uint8)
    expected = pixels.astype(np.float32) / 255.0  # the tutorial's scaling
    np.testing.assert_array_equal(pipelines.SCALED_PIXELS[pixels], expected)
    assert pipelines.SCALED_PIXELS.dtype == np.float32


def test_pair_batches_gathered_on_the_device_are_the_numpy_batches():
    pytest.importorskip("jax")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (50, 28, 28), dtype=np.uint8)
    pairs = rng.integers(0, 50, (37, 2)).astype(np.int32)
    labels = (rng.random(37) > 0.5).astype(np.float32)
    for with_labels in (labels, None):
        host = pipelines.PairBatches(images, pairs, with_labels, 8, 3, on_device=False)
        device = pipelines.PairBatches(images, pairs, with_labels, 8, 3, on_device=True)
        assert device.on_device and not host.on_device
        for _ in range(2):  # two epochs, two orders
            for index in range(len(host)):
                expected, got = host[index], device[index]
                assert type(got[0][0]).__module__.startswith("jax")
                for want, have in zip(
                    keras.tree.flatten(expected), keras.tree.flatten(got), strict=True
                ):
                    assert have.dtype == want.dtype and have.shape == want.shape
                    np.testing.assert_array_equal(np.asarray(have), want)  # bit for bit
            host.on_epoch_end()
            device.on_epoch_end()


def test_triplet_batches_gathered_on_the_device_are_the_store_rows():
    pytest.importorskip("jax")
    store = np.random.default_rng(1).normal(size=(20, 3, 3, 4)).astype(np.float32)

    def triplets(epoch):
        order = np.random.default_rng([5, epoch]).permutation(10)
        return order, order + 10, (order + 1) % 10

    host = pipelines.TripletBatches(store, triplets, 4, on_device=False)
    device = pipelines.TripletBatches(store, triplets, 4, on_device=True)
    for _ in range(2):
        for index in range(len(host)):
            ((expected),), ((got),) = host[index], device[index]
            for want, have in zip(expected, got, strict=True):
                np.testing.assert_array_equal(np.asarray(have), want)
        host.on_epoch_end()
        device.on_epoch_end()
    # A store on disk, and a run over several devices, keep the host's batches.
    assert not pipelines.TripletBatches(store, triplets, 4, 0, 2, 2, on_device=True).on_device


@helpers.needs("jax")
def test_data_stays_on_the_host_of_a_cpu(monkeypatch):
    # As under KERAS_BACKEND=jax on this machine: JAX's only device is the CPU.
    monkeypatch.setattr(devices, "keras_backend", lambda: "jax")
    assert not devices.keeps_data_on_device(1000)
    assert not devices.keeps_data_on_device(1000, device_count=2)
    monkeypatch.setattr(devices, "keras_backend", lambda: "tensorflow")
    assert not devices.keeps_data_on_device(1000)


@pytest.mark.slow
@pytest.mark.jax_only
@helpers.needs("jax")
def test_a_jax_run_with_its_data_on_the_device_trains_as_on_the_host(tmp_path):
    # Both runs at once; the triplet script's batches are checked above, row by row.
    args = [*MNIST_DATA, "--epochs", "2", "--steps-per-execution", "4"]
    runs = {
        name: helpers.start(
            MNIST,
            [*args, "--output-dir", tmp_path / name],
            tmp_path,
            python_code=code,
            env={"KERAS_BACKEND": "jax"},
        )
        for name, code in (("host", None), ("device", ON_DEVICE))
    }
    for process in runs.values():
        result = helpers.finish(process, timeout=600)
        assert result.returncode == 0, helpers.describe(result)
    host, device = read_history(tmp_path / "host"), read_history(tmp_path / "device")
    assert host == device and len(host) == 2, (host, device)  # the same numbers, every digit
    metrics = read_json(tmp_path / "device" / "metrics.json")
    assert metrics["steps_per_execution"] == 4 and metrics["epochs"] == 2
    assert len(metrics["epoch_seconds"]) == 2 and min(metrics["epoch_seconds"]) > 0
    assert metrics["seconds_per_epoch"] == pytest.approx(np.mean(metrics["epoch_seconds"]), 1e-3)


# ---------------------------------------------------------------------------
# Callbacks, and the benchmark that splits an epoch
# ---------------------------------------------------------------------------


def test_the_runs_callbacks_let_keras_run_batch_hooks_on_its_thread(tmp_path):
    # Keras runs batch-end hooks on a thread of its own only when every callback has the
    # default hooks or says `async_safe`; one that does not makes the loop wait each step.
    for callback in run_folder.training_callbacks(tmp_path):
        default = all(
            getattr(type(callback), hook) is getattr(keras.callbacks.Callback, hook)
            for hook in ("on_batch_end", "on_train_batch_end", "on_test_batch_end")
        )
        assert default or getattr(callback, "async_safe", False), type(callback).__name__


@pytest.mark.slow
@helpers.needs("jax")
def test_epoch_split_shows_no_trace_after_the_first_epoch(tmp_path):
    args = ["mnist_siamese.py", *MNIST_DATA, "--epochs", "3", "--output-dir", tmp_path / "m"]
    result = helpers.run(
        REPOSITORY / "benchmarks" / "epoch_split.py",
        args,
        REPOSITORY,
        env={"KERAS_BACKEND": "jax"},
        timeout=600,
    )
    assert result.returncode == 0, helpers.describe(result)
    rows = re.findall(r"^\s+(\d)\s+([\d.]+)\s+(\d+)\s.*\s(\d+)$", result.stdout, re.MULTILINE)
    assert [row[0] for row in rows] == ["1", "2", "3"], result.stdout
    assert all(row[2] == "8" for row in rows)  # training steps an epoch
    assert int(rows[0][3]) >= 1 and [row[3] for row in rows[1:]] == ["0", "0"], result.stdout
    ratios = re.findall(r"^epoch \d: ([\d.]+) x the benchmark steps; ", result.stdout, re.MULTILINE)
    assert len(ratios) == 2 and all(float(ratio) > 0.5 for ratio in ratios), result.stdout


# ---------------------------------------------------------------------------
# One trace under TensorFlow: of the frozen trunk, and of the triplet step
# ---------------------------------------------------------------------------

tensorflow_backend = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow", reason="counts TensorFlow's traces"
)


@tensorflow_backend
def test_the_trunk_is_traced_once_for_every_list_and_a_short_last_batch(tmp_path):
    from PIL import Image

    calls = []

    class Counted(keras.layers.Layer):  # its Python runs once a trace under tf.function
        def call(self, inputs):
            calls.append(inputs.shape)
            return keras.ops.mean(inputs, axis=(1, 2))

    inputs = keras.Input((8, 8, 3))
    trunk = keras.Model(inputs, Counted()(inputs))
    calls.clear()  # the call that built the model
    files = []
    for number in range(12):
        files.append(tmp_path / f"{number:02d}.png")
        Image.fromarray(np.full((8, 8, 3), number * 20, np.uint8)).save(files[-1])

    def load(name):
        import tensorflow as tf

        image = tf.io.decode_png(tf.io.read_file(name), channels=3)
        return tf.cast(tf.reshape(image, (8, 8, 3)), "float32")

    # Batches of 4: 5 files end on a short batch, then another list of 7 files.
    (first, second), _ = stores.cache_inputs(
        [map(str, files[:5]), map(str, files[5:])], load, (8, 8), 4, trunk=trunk
    )
    np.testing.assert_allclose(np.concatenate([first, second])[:, 0], np.arange(12) * 20.0)
    assert len(calls) == 1, calls  # one trace for the two lists and every batch size


@tensorflow_backend
def test_the_triplet_step_is_traced_once_in_a_fit():
    import triplet_totally_looks_like as tll

    inputs = keras.Input((5,))
    embedding = keras.Model(inputs, keras.layers.Dense(3)(inputs))
    model = tll.SiameseModel(tll.build_siamese_network(embedding), 0.5)
    traces = []
    original_step = model.train_step

    def counted_step(data):  # runs once a trace of the compiled step
        traces.append(1)
        return original_step(data)

    model.train_step = counted_step
    store = np.random.default_rng(0).normal(size=(30, 5)).astype("float32")
    triplets = tll.validation_triplet_indices(np.roll(np.arange(10), 1))
    dataset = stores.make_store_dataset(store, triplets, 4)  # 10 triplets: a short last batch
    history = tll.train(model, dataset, dataset, 2, 1e-3, (False, 1), [])
    assert len(history.history["loss"]) == 2
    # Adam's slots made in the first trace would make TensorFlow trace the step again.
    assert len(traces) == 1, traces
