"""mnist_siamese.py under each Keras 3 backend: JAX and PyTorch without TensorFlow.

Each test starts the script in a subprocess with `KERAS_BACKEND` set; the bad inputs under
JAX run in the test process where it runs JAX. A backend that is not installed skips its
tests, with the reason: CI installs TensorFlow and JAX in its main environment and runs this
module again in an environment with JAX and without TensorFlow (`.ci/run`); PyTorch is not a
CI dependency (a multi-gigabyte install).
"""

import json
import re
import textwrap

import helpers
import keras
import numpy as np
import pytest
from helpers import FIXTURE, MNIST, describe, installed, needs

PROG = "mnist_siamese.py"


def run_under(backend, args, cwd, without_tensorflow=False):
    """`helpers.run` of the MNIST script with KERAS_BACKEND set to `backend`."""
    code = helpers.RUN_WITHOUT_TENSORFLOW if without_tensorflow else None
    return helpers.run(MNIST, args, cwd, code, env={"KERAS_BACKEND": backend})


def refused_under_jax(args, cwd, capsys):
    """The script under JAX with `args` it refuses: its `main()` in this process where this
    process runs JAX (CI's JAX lane), which spares a process's imports; else `run_under`."""
    if keras.backend.backend() == "jax":
        import mnist_siamese

        return helpers.run_main(mnist_siamese, args, cwd, capsys)
    return run_under("jax", args, cwd)


SMALL_RUN = [
    "--data",
    FIXTURE,
    "--limit",
    "600",
    "--no-plots",
    "--epochs",
    "2",
    "--batch-size",
    "32",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small run under each installed backend of TensorFlow and JAX: backend -> folder."""
    folders = {}
    for backend in ("tensorflow", "jax"):
        if not installed(backend):
            continue
        cwd = tmp_path_factory.mktemp(backend)
        result = run_under(backend, [*SMALL_RUN, "--output-dir", "out"], cwd)
        assert result.returncode == 0, describe(result)
        folders[backend] = (cwd / "out", result)
    return folders


@pytest.mark.slow
@pytest.mark.jax_only
@needs("jax")
def test_dry_run_under_jax_needs_no_tensorflow(tmp_path):
    result = run_under("jax", ["--dry-run"], tmp_path, without_tensorflow=True)
    assert result.returncode == 0, describe(result)
    assert result.stdout.splitlines()[0] == "Backend: jax. Device: CPU"
    assert result.stderr.strip() == "", result.stderr
    output_dir = tmp_path / "runs" / "mnist_siamese_dry_run"
    metrics = json.loads((output_dir / "metrics.json").read_text())
    assert metrics["backend"] == "jax" and metrics["intra_op_threads"] is None
    assert metrics["test_accuracy"] >= 0.75, metrics
    for name in ("siamese_model.keras", "embedding_network.keras", "history.csv", "pairs.png"):
        assert (output_dir / name).is_file(), name


@pytest.mark.slow
@needs("torch")
def test_dry_run_under_pytorch_needs_no_tensorflow(tmp_path):
    # Not run with TensorFlow blocked: PyTorch's compiler probes for it with find_spec.
    result = run_under("torch", ["--dry-run"], tmp_path)
    assert result.returncode == 0, describe(result)
    assert re.fullmatch(r"Backend: torch\. Device: (CPU|GPU)", result.stdout.splitlines()[0])
    metrics = json.loads((tmp_path / "runs" / "mnist_siamese_dry_run" / "metrics.json").read_text())
    assert metrics["backend"] == "torch" and metrics["test_accuracy"] >= 0.75, metrics


# Loads each run's two models given under the backend of this process and prints the
# distances they give fixed pairs of images, two ways: the Siamese model, and its embedding
# network. One process per backend reloads every run (a process costs seconds of imports).
RELOAD = textwrap.dedent(
    """
    import json, pathlib, sys
    import mnist_siamese  # registers the custom layer, loss and metric
    import keras
    import numpy as np

    images = np.random.default_rng(0).random((64, 28, 28)).astype("float32")
    reloaded = {}
    for output_dir in map(pathlib.Path, sys.argv[2:]):
        siamese = keras.saving.load_model(output_dir / "siamese_model.keras")
        embedding = keras.saving.load_model(output_dir / "embedding_network.keras")
        distances = siamese.predict([images[:32], images[32:]], verbose=0).ravel()
        embedded = embedding.predict(images, verbose=0)
        reloaded[str(output_dir)] = {
            "backend": keras.backend.backend(),
            "distances": distances.tolist(),
            "embedding": embedded[:4].tolist(),
            "margin": siamese.loss.margin,
        }
    print(json.dumps(reloaded))
    """
)


@pytest.fixture(scope="module")
def reloaded(trained, tmp_path_factory):
    """Every trained run reloaded under each backend: {(saved under, reloaded under): numbers}."""
    cwd = tmp_path_factory.mktemp("reload")
    results = {}
    for backend in ("tensorflow", "jax"):
        folders = [str(output_dir) for output_dir, _ in trained.values()]
        env = {"KERAS_BACKEND": backend}
        result = helpers.run(MNIST, folders, cwd, RELOAD, env, timeout=120)
        assert result.returncode == 0, describe(result)
        printed = json.loads(result.stdout.strip().splitlines()[-1])
        for saved_under, (output_dir, _) in trained.items():
            results[saved_under, backend] = printed[str(output_dir)]
    return results


@pytest.mark.slow
@needs("tensorflow", "jax")
@pytest.mark.parametrize("saved_under", ["tensorflow", "jax"])
def test_models_saved_under_one_backend_reload_under_the_other(reloaded, saved_under):
    results = {backend: reloaded[saved_under, backend] for backend in ("tensorflow", "jax")}
    assert results["tensorflow"]["backend"] == "tensorflow" and results["jax"]["backend"] == "jax"
    distances = np.array(results["jax"]["distances"])
    assert distances.min() > 0 and np.ptp(distances) > 0  # a trained, working model
    # The same weights give the same numbers; the backends' kernels differ only in rounding.
    np.testing.assert_allclose(distances, results["tensorflow"]["distances"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(
        results["jax"]["embedding"], results["tensorflow"]["embedding"], rtol=1e-4, atol=1e-5
    )
    assert results["jax"]["margin"] == results["tensorflow"]["margin"] == 1.0


@pytest.mark.slow
@needs("jax")
def test_small_run_under_jax_learns_and_saves(trained):
    output_dir, result = trained["jax"]
    metrics = json.loads((output_dir / "metrics.json").read_text())
    assert metrics["epochs"] == 2 and metrics["backend"] == "jax"
    assert metrics["test_accuracy"] > 0.6, metrics
    assert result.stdout.splitlines()[-1].startswith("* Accuracy on test set: ")


@pytest.mark.jax_only
@needs("jax")
@pytest.mark.parametrize(
    ("args", "hints"),
    [
        (["--intra-op-threads", "2"], ["--intra-op-threads", "KERAS_BACKEND=tensorflow", "jax"]),
        (["--distribute", "mirrored"], ["MirroredStrategy", "KERAS_BACKEND=tensorflow"]),
    ],
)
def test_tensorflow_only_options_under_jax(args, hints, tmp_path, capsys):
    result = refused_under_jax(["--dry-run", *args], tmp_path, capsys)
    helpers.assert_one_line_error(result, PROG, *hints)
    assert not (tmp_path / "runs").exists()  # refused before anything was written


@pytest.mark.slow
@needs("tensorflow")
def test_multi_process_under_tensorflow_names_the_upstream_issue(tmp_path):
    result = run_under("tensorflow", ["--dry-run", "--distribute", "multi-process"], tmp_path)
    helpers.assert_one_line_error(
        result, PROG, "KERAS_BACKEND=jax", "keras-team/keras/issues/20585"
    )


def cluster(addresses="127.0.0.1:1234", count="2", index="0"):
    return {
        "KERAS_DISTRIBUTION_JOB_ADDRESSES": addresses,
        "KERAS_DISTRIBUTION_NUM_PROCESSES": count,
        "KERAS_DISTRIBUTION_PROCESS_ID": index,
    }


@pytest.mark.jax_only
@needs("jax")
@pytest.mark.parametrize(
    ("variables", "hint"),
    [
        ({}, "needs KERAS_DISTRIBUTION_JOB_ADDRESSES"),
        (
            {"KERAS_DISTRIBUTION_JOB_ADDRESSES": "127.0.0.1:1234"},
            "needs KERAS_DISTRIBUTION_NUM_PROCESSES",
        ),
        (
            cluster(addresses="localhost"),
            "KERAS_DISTRIBUTION_JOB_ADDRESSES: 'localhost' is not HOST:PORT",
        ),
        (cluster(count="two"), "KERAS_DISTRIBUTION_NUM_PROCESSES must be a whole number"),
        (cluster(index="2"), "KERAS_DISTRIBUTION_PROCESS_ID must be from 0 to 1"),
        (cluster(addresses="a:1,b:2,c:3"), "lists 3 addresses for 2 processes"),
    ],
)
def test_multi_process_names_a_missing_or_malformed_variable(
    variables, hint, tmp_path, monkeypatch, capsys
):
    for name in ("JOB_ADDRESSES", "NUM_PROCESSES", "PROCESS_ID"):
        monkeypatch.delenv(f"KERAS_DISTRIBUTION_{name}", raising=False)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    result = refused_under_jax(["--dry-run", "--distribute", "multi-process"], tmp_path, capsys)
    helpers.assert_one_line_error(result, PROG, hint)
    assert not (tmp_path / "runs").exists()
