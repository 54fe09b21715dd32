"""`export`: a run's embedding model for serving, checked against Keras before it is kept.

The MNIST cases call `main()` in this process on a run folder holding a freshly built (not
trained) embedding network: the export and its check do not care what the weights learned.
The command's bad inputs each end in one line and exit code 2, and leave nothing behind.
"""

import os

import helpers
import numpy as np
import pytest
from helpers import FIXTURE, MNIST

# Imported before any test: the first import sets process-wide settings (see conftest.py).
import mnist_siamese
from siamese_support import export

PROG = "mnist_siamese.py"
needs_tensorflow = helpers.needs("tensorflow")


def keras_backend():
    """The Keras backend the tests run under (KERAS_BACKEND)."""
    return mnist_siamese.keras.backend.backend()


@pytest.fixture(scope="module")
def mnist_run(tmp_path_factory):
    """A folder holding `embedding_network.keras`, as a finished MNIST run has it."""
    run_dir = tmp_path_factory.mktemp("mnist-run")
    _, base_network = mnist_siamese.create_siamese_network((28, 28))
    base_network.save(run_dir / "embedding_network.keras")
    return run_dir


def export_mnist(run_dir, cwd, capsys, *options):
    """`mnist_siamese.py export RUN_DIR OPTIONS` in this process, as a finished process."""
    return helpers.run_main(mnist_siamese, ["export", run_dir, *options], cwd, capsys)


def leftovers(folder):
    """The staging folders an export left in `folder` (none, after any ending)."""
    return sorted(path.name for path in folder.iterdir() if path.name.startswith(".tmp-"))


def digits():
    """The test digits the export is checked on, as the model takes them."""
    with np.load(FIXTURE) as data:
        return data["x_test"][: export.SAMPLE_COUNT].astype(np.float32) / 255.0


@needs_tensorflow
def test_a_saved_model_gives_the_keras_models_embeddings(mnist_run, tmp_path, capsys):
    import keras
    import tensorflow as tf

    output = tmp_path / "served"
    result = export_mnist(mnist_run, tmp_path, capsys, "--output", output)
    assert result.returncode == 0, helpers.describe(result)
    assert f"Exported the embedding model to {output} (tf_saved_model)" in result.stdout
    assert "largest difference from the Keras model's embeddings is" in result.stdout
    assert (output / "saved_model.pb").is_file()
    assert leftovers(tmp_path) == []
    # Reloaded as a user would, with TensorFlow alone.
    served = tf.saved_model.load(str(output))
    keras_model = keras.saving.load_model(mnist_run / "embedding_network.keras")
    images = digits()
    embeddings = served.serve(tf.constant(images)).numpy()
    assert embeddings.shape == (len(images), 128)
    np.testing.assert_allclose(embeddings, keras_model.predict(images, verbose=0), atol=1e-5)


@needs_tensorflow
def test_the_default_output_is_in_the_run_folder_and_overwrite_replaces_it(
    mnist_run, tmp_path, capsys
):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(mnist_run, run_dir)
    first = export_mnist(run_dir, tmp_path, capsys)
    assert first.returncode == 0, helpers.describe(first)
    output = run_dir / "embedding_saved_model"
    assert (output / "saved_model.pb").is_file()
    (output / "left-by-the-first.txt").write_text("old")
    again = export_mnist(run_dir, tmp_path, capsys)
    helpers.assert_one_line_error(again, PROG, str(output), "--overwrite")
    assert (output / "left-by-the-first.txt").is_file()
    replaced = export_mnist(run_dir, tmp_path, capsys, "--overwrite")
    assert replaced.returncode == 0, helpers.describe(replaced)
    assert (output / "saved_model.pb").is_file()
    assert not (output / "left-by-the-first.txt").exists()  # the whole folder was replaced
    assert leftovers(run_dir) == []


def test_a_folder_without_a_model_is_refused(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    result = export_mnist(tmp_path / "empty", tmp_path, capsys)
    helpers.assert_one_line_error(result, PROG, "holds no embedding_network.keras")
    missing = export_mnist(tmp_path / "nowhere", tmp_path, capsys)
    helpers.assert_one_line_error(missing, PROG, "no run folder")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["empty"]


@needs_tensorflow
def test_a_damaged_model_is_refused(mnist_run, tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    whole = (mnist_run / "embedding_network.keras").read_bytes()
    (run_dir / "embedding_network.keras").write_bytes(whole[: len(whole) // 2])
    result = export_mnist(run_dir, tmp_path, capsys)
    helpers.assert_one_line_error(result, PROG, "cannot be loaded", "damaged or incomplete")
    assert sorted(path.name for path in run_dir.iterdir()) == ["embedding_network.keras"]


def test_an_unknown_format_is_refused(mnist_run, tmp_path, capsys):
    result = export_mnist(mnist_run, tmp_path, capsys, "--format", "pickle")
    helpers.assert_one_line_error(result, f"{PROG} export", "invalid choice: 'pickle'")


def test_an_output_that_exists_or_lies_in_a_missing_folder_is_refused(mnist_run, tmp_path, capsys):
    existing = tmp_path / "mine.onnx"
    existing.write_text("a user's file")
    result = export_mnist(mnist_run, tmp_path, capsys, "--format", "onnx", "--output", existing)
    helpers.assert_one_line_error(result, PROG, f"{existing} exists", "--overwrite")
    assert existing.read_text() == "a user's file"
    nowhere = tmp_path / "missing" / "served"
    result = export_mnist(mnist_run, tmp_path, capsys, "--output", nowhere)
    helpers.assert_one_line_error(result, PROG, "does not exist", str(nowhere))
    assert sorted(path.name for path in tmp_path.iterdir()) == ["mine.onnx"]


@pytest.mark.skipif(keras_backend() != "tensorflow", reason="ONNX exports under TensorFlow")
def test_a_format_whose_library_is_missing_says_what_to_install(
    mnist_run, tmp_path, capsys, monkeypatch
):
    real_find_spec = export.importlib.util.find_spec
    monkeypatch.setattr(
        export.importlib.util,
        "find_spec",
        lambda name, *args: None if name == "onnxruntime" else real_find_spec(name, *args),
    )
    result = export_mnist(mnist_run, tmp_path, capsys, "--format", "onnx")
    line = helpers.assert_one_line_error(result, PROG, "--format onnx needs ", "onnxruntime")
    assert "pip install -r requirements-onnx.txt" in line
    assert not (mnist_run / "embedding.onnx").exists()


@pytest.mark.skipif(keras_backend() != "jax", reason="the JAX backend's answer")
def test_under_jax_onnx_says_to_export_under_tensorflow(mnist_run, tmp_path, capsys):
    result = export_mnist(mnist_run, tmp_path, capsys, "--format", "onnx")
    helpers.assert_one_line_error(result, PROG, "KERAS_BACKEND=tensorflow", "loads under any")
    assert not (mnist_run / "embedding.onnx").exists()


@pytest.mark.skipif(keras_backend() != "tensorflow", reason="ONNX exports under TensorFlow")
@helpers.needs("onnx", "tf2onnx", "onnxruntime")
def test_an_onnx_export_gives_the_keras_models_embeddings(mnist_run, tmp_path, capsys):
    import keras
    import onnxruntime

    output = tmp_path / "embedding.onnx"
    result = export_mnist(mnist_run, tmp_path, capsys, "--format", "onnx", "--output", output)
    assert result.returncode == 0, helpers.describe(result)
    assert f"Exported the embedding model to {output} (onnx)" in result.stdout
    assert result.stderr == "", result.stderr  # no converter warnings
    assert sorted(path.name for path in tmp_path.iterdir()) == ["embedding.onnx"]
    session = onnxruntime.InferenceSession(output, providers=["CPUExecutionProvider"])
    assert [put.name for put in session.get_inputs()] == ["image"]
    keras_model = keras.saving.load_model(mnist_run / "embedding_network.keras")
    images = digits()
    (embeddings,) = session.run(None, {"image": images})
    np.testing.assert_allclose(embeddings, keras_model.predict(images, verbose=0), atol=1e-5)


@pytest.mark.skipif(helpers.installed("tensorflow"), reason="TensorFlow is installed here")
def test_without_tensorflow_a_saved_model_says_to_install_it(mnist_run, tmp_path, capsys):
    result = export_mnist(mnist_run, tmp_path, capsys, "--output", tmp_path / "served")
    helpers.assert_one_line_error(result, PROG, "needs tensorflow", "pip install tensorflow")
    assert list(tmp_path.iterdir()) == []


@needs_tensorflow
def test_an_export_that_gives_other_embeddings_is_not_kept(
    mnist_run, tmp_path, capsys, monkeypatch
):
    real = export.reload_and_embed
    monkeypatch.setattr(
        export, "reload_and_embed", lambda *args: real(*args) + 10 * export.TOLERANCE
    )
    result = export_mnist(mnist_run, tmp_path, capsys, "--output", tmp_path / "served")
    helpers.assert_one_line_error(result, PROG, "differ from the Keras model's", "nothing")
    assert list(tmp_path.iterdir()) == []


@needs_tensorflow
def test_ctrl_c_during_an_export_leaves_nothing(mnist_run, tmp_path, capsys, monkeypatch):
    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(export, "reload_and_embed", interrupted)
    existing = tmp_path / "served"
    existing.mkdir()
    (existing / "earlier.txt").write_text("kept")
    result = export_mnist(mnist_run, tmp_path, capsys, "--output", existing, "--overwrite")
    line = helpers.assert_one_line_error(result, PROG, code=130)
    assert line == f"{PROG}: interrupted", line
    assert sorted(path.name for path in tmp_path.iterdir()) == ["served"]
    assert (existing / "earlier.txt").read_text() == "kept"


@pytest.mark.slow
@helpers.needs("tensorflow", "jax")
def test_under_jax_the_saved_model_matches_too(mnist_run, tmp_path):
    """JAX exports through jax2tf, which needs TensorFlow installed beside it."""
    output = tmp_path / "served"
    env = dict(os.environ, KERAS_BACKEND="jax")
    result = helpers.run(MNIST, ["export", mnist_run, "--output", output], tmp_path, env=env)
    assert result.returncode == 0, helpers.describe(result)
    assert (output / "saved_model.pb").is_file()
    # Served by TensorFlow alone, in this process (another would pay TensorFlow's import).
    import tensorflow as tf

    served = tf.saved_model.load(str(output))
    assert served.serve(tf.zeros((2, 28, 28))).numpy().shape == (2, 128)


@pytest.mark.slow
@needs_tensorflow
def test_the_triplet_embedding_exports_with_its_preprocessing_inside(tmp_path, capsys):
    """The saved model takes 0-255 images: its first layer (ResNet's preprocessing) is in it.
    In this process: a subprocess would pay the imports again (the export takes 15-40 s)."""
    import triplet_totally_looks_like as tll

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    tll.build_embedding_network((32, 32), weights=None).save(run_dir / "embedding.keras")
    output = tmp_path / "served"
    result = helpers.run_main(tll, ["export", run_dir, "--output", output], tmp_path, capsys)
    assert result.returncode == 0, helpers.describe(result)
    assert "(tf_saved_model). Checked on 16 images" in result.stdout
    assert (output / "saved_model.pb").is_file()


def test_a_run_of_the_other_script_is_named(tmp_path, capsys):
    (tmp_path / "embedding.keras").write_bytes(b"")  # a triplet run's model file
    result = export_mnist(tmp_path, tmp_path, capsys, "--output", tmp_path / "served")
    helpers.assert_one_line_error(result, PROG, "holds a model of triplet_totally_looks_like.py")


def test_under_pytorch_a_saved_model_is_refused_in_one_line(
    mnist_run, tmp_path, capsys, monkeypatch
):
    monkeypatch.setattr(export, "keras_backend", lambda: "torch")
    result = export_mnist(mnist_run, tmp_path, capsys, "--output", tmp_path / "served")
    helpers.assert_one_line_error(result, PROG, "the tensorflow or jax backend, not torch")
    assert list(tmp_path.iterdir()) == []
