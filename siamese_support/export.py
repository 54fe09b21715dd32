"""`export`: a run's embedding model in a format for serving, checked before it is kept.

The tutorials end with a trained model in Python. To serve it (a web service, a phone),
Keras 3 writes it in another runtime's format with `Model.export`. Here the export is
written beside its destination under a temporary name, reloaded by that runtime (not by
Keras), run on a few images, and kept only if its embeddings match the Keras model's:
a failed or interrupted export leaves nothing behind, and an existing file or folder is
replaced only with `--overwrite`.
"""

import contextlib
import importlib.util
import io
import logging
import os
import pathlib
import shutil
import tempfile
import warnings

import numpy as np

from siamese_support import command_line, devices, synthetic, trained_model

# For each format `--format` takes: what it writes, the modules it needs (to export and to
# reload the result for the check), and how to install them.
FORMATS = {
    "tf_saved_model": {
        "writes": "folder",
        "modules": ("tensorflow",),
        "install": "pip install tensorflow",
        # Under JAX through jax2tf, which needs TensorFlow too; Keras has no such path from
        # PyTorch.
        "backends": ("tensorflow", "jax"),
    },
    "onnx": {
        "writes": "file",
        "modules": ("onnx", "tf2onnx", "onnxruntime"),
        "install": "pip install -r requirements-onnx.txt",
        # Keras converts through tf2onnx under TensorFlow. Under JAX it needs jax2onnx (and
        # its ~45 dependencies), whose ResNet50 file ONNX Runtime 1.32 cannot run (a 4-D
        # max pooling); a `.keras` file reloads under TensorFlow, so that is the way.
        "backends": ("tensorflow",),
    },
}
# The default --output inside the run folder.
DEFAULT_NAMES = {"tf_saved_model": "embedding_saved_model", "onnx": "embedding.onnx"}
# The largest difference allowed between the export's embeddings and the Keras model's, as
# a fraction of the largest embedding value: float32 arithmetic in another runtime's kernels
# differs in its last digits (measured: docs/results.md#export), a wrong export by far more.
TOLERANCE = 1e-4
# How many images the check embeds.
SAMPLE_COUNT = 16
# The images each script's model takes (their dimensions after the batch, and channels).
INPUTS = {"mnist_siamese.py": (2, None), "triplet_totally_looks_like.py": (3, 3)}
MNIST_DIGITS = pathlib.Path(__file__).resolve().parents[1] / "data" / "mnist-tiny.npz"


def keras_backend():
    """The Keras backend of this process, as `KERAS_BACKEND` names it."""
    import keras

    return keras.backend.backend()


def missing_modules(export_format):
    """The modules `export_format` needs that are not installed, in their order."""
    needed = FORMATS[export_format]["modules"]
    return [name for name in needed if importlib.util.find_spec(name) is None]


def sample_images(script, input_shape):
    """Images to check an export with, as the model takes them (float32).

    MNIST: the first test digits of the repository's `data/mnist-tiny.npz`, scaled to
    [0, 1]. Triplet: generated scenes (`synthetic`) at the model's size, 0-255 RGB.
    """
    if script == "mnist_siamese.py":
        with np.load(MNIST_DIGITS) as data:
            return data["x_test"][:SAMPLE_COUNT].astype(np.float32) / 255.0
    return synthetic.generated_images(SAMPLE_COUNT, input_shape[0]).astype(np.float32)


def input_signature(model):
    """The model's input named `image`, any batch size: the name a served model's callers
    use (Keras would name it after its tensor, `keras_tensor` or `input_layer`)."""
    import keras

    shape = (None, *model.input_shape[1:])
    return [keras.InputSpec(shape=shape, dtype="float32", name="image")]


def reload_and_embed(path, export_format, images):
    """Load the export at `path` with its own runtime, not Keras, and embed `images`."""
    if export_format == "tf_saved_model":
        import tensorflow as tf

        # A JAX export warns on loading that its gradients were not saved: not needed here.
        absl_logger = logging.getLogger("absl")
        level = absl_logger.level
        absl_logger.setLevel(logging.ERROR)
        try:
            loaded = tf.saved_model.load(str(path))  # kept: its variables live as long as it does
        finally:
            absl_logger.setLevel(level)
        return np.asarray(loaded.serve(tf.constant(images)))
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {"image": images})[0])


def largest_difference(expected, exported):
    """The largest absolute difference between two arrays of embeddings of one shape."""
    expected, exported = np.asarray(expected), np.asarray(exported)
    if expected.shape != exported.shape:
        raise ValueError(
            f"the export gives embeddings of shape {exported.shape[1:]}, not {expected.shape[1:]}"
        )
    return float(np.max(np.abs(expected.astype(np.float64) - exported)))


@contextlib.contextmanager
def variable_kept(name):
    """The environment variable `name` as it was before the block, whatever the block did."""
    before = os.environ.get(name)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


def check_output(output, overwrite):
    """Refuse an `--output` that exists (without `--overwrite`) or whose folder is missing."""
    output = pathlib.Path(output)
    if (output.exists() or output.is_symlink()) and not overwrite:
        raise ValueError(f"{output} exists: choose another --output, or add --overwrite")
    if not output.parent.is_dir():
        raise ValueError(f"the folder of --output {output} does not exist: create it first")


@contextlib.contextmanager
def staging_folder(output):
    """A temporary folder beside `output` (same file system: the move is a rename), removed
    with whatever is left in it when the block ends, however it ends."""
    folder = tempfile.mkdtemp(prefix=f".tmp-export-{pathlib.Path(output).name}-", dir=output.parent)
    try:
        yield pathlib.Path(folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def move_into_place(written, output, staging):
    """Put `written` at `output`; an existing `output` goes into `staging` first, and comes
    back if the move fails."""
    set_aside = None
    if output.exists() or output.is_symlink():
        set_aside = staging / "replaced"
        os.replace(output, set_aside)
    try:
        os.replace(written, output)
    except BaseException:
        if set_aside is not None:
            os.replace(set_aside, output)
        raise


def export_run(run_dir, export_format, output=None, overwrite=False, script_file=None):
    """Export the embedding model of the run in `run_dir` as `export_format`.

    `script_file`: the path of the script that trained it (a script passes `__file__`).
    `output` defaults to a name in the run folder (`DEFAULT_NAMES`). Raises `ValueError`
    (one line for the user) for a run folder without a model, a damaged model, a missing
    library, an `output` that exists or lies in a missing folder, and an export whose
    embeddings differ from the Keras model's by more than `TOLERANCE`. Returns 0.
    """
    script = os.path.basename(script_file)
    model_path = trained_model.find_model(run_dir, script)
    output = pathlib.Path(output or pathlib.Path(run_dir) / DEFAULT_NAMES[export_format])
    check_output(output, overwrite)
    backends = FORMATS[export_format].get("backends")
    if backends and keras_backend() not in backends:
        raise ValueError(
            f"--format {export_format} exports under the {' or '.join(backends)} backend, not "
            f"{keras_backend()}: the model loads under any, so run KERAS_BACKEND={backends[0]} "
            f"python {script} export ..."
        )
    missing = missing_modules(export_format)
    if missing:
        install = FORMATS[export_format]["install"]
        raise ValueError(
            f"--format {export_format} needs {', '.join(missing)}, not installed in this "
            f"Python: {install}"
        )
    if "tensorflow" in FORMATS[export_format]["modules"]:
        with devices.quiet_tensorflow_start():  # under JAX, imported here: its notices
            import tensorflow  # noqa: F401
    model = trained_model.load_embedding_model(model_path, script, *INPUTS[script])
    images = sample_images(script, tuple(model.input_shape[1:]))
    expected = np.asarray(model(images, training=False))
    with staging_folder(output) as staging:
        written = staging / output.name
        print(f"Exporting {model_path} as {export_format} ...", flush=True)
        try:
            # Keras's own lines about it; a FutureWarning of its patch of tf2onnx for NumPy 2;
            # tf2onnx sets TensorFlow's C++ log level for the whole process: put it back.
            quiet = contextlib.redirect_stdout(io.StringIO())
            with quiet, warnings.catch_warnings(), variable_kept("TF_CPP_MIN_LOG_LEVEL"):
                warnings.simplefilter("ignore", FutureWarning)
                model.export(str(written), export_format, False, input_signature(model))
            exported = reload_and_embed(written, export_format, images)
        except (KeyboardInterrupt, OSError):
            raise
        except Exception as error:  # the converters raise many kinds: one line, exit 2
            problem = command_line.one_line(error)
            raise ValueError(f"the {export_format} export failed ({problem})") from None
        difference = largest_difference(expected, exported)
        allowed = TOLERANCE * max(1.0, float(np.max(np.abs(expected))))
        if not difference <= allowed:  # also when the export gives NaN
            raise ValueError(
                f"the {export_format} export's embeddings differ from the Keras model's by "
                f"{difference:.3g} (more than {allowed:.3g}): nothing was written"
            )
        move_into_place(written, output, staging)
    print(
        f"Exported the embedding model to {output} ({export_format}). Checked on "
        f"{len(images)} images: the largest difference from the Keras model's embeddings is "
        f"{difference:.2g} (allowed: {allowed:.2g})."
    )
    return 0
