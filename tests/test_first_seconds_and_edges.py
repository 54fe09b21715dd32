"""The first seconds of a run, its last ones, and the edges of MNIST's `compare` and of resuming.

Each case runs a script as a user would and checks the exit code, the one line the user
reads, that no traceback shows, and what the output folder holds afterwards. Where the
process is the point (Ctrl-C, choosing the backend, a scheduler's retry) the script runs in
a subprocess; elsewhere the test calls its `main()` in this process, which spares the
subprocess's imports (5 s or more) and goes through the same one-line errors and exit codes.
Ctrl-C is sent by the child to itself, with Python's default SIGINT handling restored, at
the moment its import of a given module begins: inside the start-up, whatever the machine's
speed. The cases run under any backend (CI runs them under JAX without TensorFlow too).
"""

import importlib.util
import json
import shutil

import helpers
import pytest
from helpers import FIXTURE, MNIST, TRIPLET, assert_one_line_error, describe

# Imported here, before any test: the first import sets process-wide settings (environment
# variables of TensorFlow's) that conftest.py's guard would blame on the test.
import mnist_siamese
from siamese_support import command_line, run_folder, trained_model

# Run by `python -c`: sends SIGINT to this process when the import of INTERRUPT_AT starts,
# then runs the script (sys.argv[1]) as the shell would.
INTERRUPT_INSIDE_IMPORT = """
import importlib.abc, os, runpy, signal, sys

class InterruptAt(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == os.environ["INTERRUPT_AT"]:
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.SIGINT)
        return None

sys.meta_path.insert(0, InterruptAt())
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""

# A small MNIST run: 1,000 training and 1,000 test images of the fixture, no plots.
MNIST_RUN = ["--data", FIXTURE, "--limit", "1000", "--no-plots", "--epochs", "1"]
# For an MNIST run's main() in this process (`helpers.same_threads`).
IN_PROCESS_THREADS = helpers.same_threads()


def interrupted_at(module, script, args, cwd, env=None):
    """Run the script, interrupted when it starts importing `module`."""
    env = {**(env or {}), "INTERRUPT_AT": module}
    return helpers.run(script, args, cwd, python_code=INTERRUPT_INSIDE_IMPORT, env=env)


# ---------------------------------------------------------------------------
# Ctrl-C in the first seconds
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "module",
    ["numpy", "keras", "keras.src.backend", "matplotlib"],
)
def test_ctrl_c_while_mnist_imports_is_one_line_and_writes_nothing(tmp_path, module):
    result = interrupted_at(module, MNIST, ["--dry-run", "--output-dir", "run"], tmp_path)
    line = assert_one_line_error(result, "mnist_siamese.py", code=130)
    assert line == "mnist_siamese.py: interrupted while starting; nothing was written"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("module", ["keras", "keras.src.backend"])
def test_ctrl_c_while_the_triplet_script_imports_keras(tmp_path, module):
    args = ["search", "--gallery", tmp_path, "--run-dir", tmp_path / "run", "query.png"]
    result = interrupted_at(module, TRIPLET, args, tmp_path)
    assert_one_line_error(result, "triplet_totally_looks_like.py", "while starting", code=130)
    result = interrupted_at(module, TRIPLET, ["--dry-run", "--output-dir", "run"], tmp_path)
    assert_one_line_error(result, "triplet_totally_looks_like.py", "while starting", code=130)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_ctrl_c_before_main_is_left_alone_where_it_is_ignored(tmp_path):
    """A script started with SIGINT ignored (a background job) keeps ignoring it."""
    code = "import signal; signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
    code += INTERRUPT_INSIDE_IMPORT
    args = [*MNIST_RUN, "--output-dir", "run"]
    result = helpers.run(MNIST, args, tmp_path, python_code=code, env={"INTERRUPT_AT": "keras"})
    assert result.returncode == 0, describe(result)
    assert (tmp_path / "run" / "metrics.json").exists()


def test_the_quiet_handler_is_only_for_a_script_run_from_the_shell():
    import signal

    before = signal.getsignal(signal.SIGINT)
    command_line.quiet_interrupts_outside_main("mnist_siamese", "mnist_siamese.py")
    assert signal.getsignal(signal.SIGINT) is before


# ---------------------------------------------------------------------------
# The backend
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("script", [MNIST, TRIPLET], ids=["mnist", "triplet"])
def test_an_unknown_backend_is_one_line_naming_the_backends(tmp_path, script):
    result = helpers.run(script, ["--dry-run"], tmp_path, env={"KERAS_BACKEND": "nonsense"})
    assert_one_line_error(
        result, script.name, "KERAS_BACKEND=nonsense is not a Keras backend", "tensorflow, jax"
    )
    assert list(tmp_path.iterdir()) == []


def test_a_backend_in_keras_json_is_named_with_its_file(tmp_path):
    home = tmp_path / "keras-home"
    home.mkdir()
    (home / "keras.json").write_text(json.dumps({"backend": "tensorflw"}))
    env = {"KERAS_BACKEND": "", "KERAS_HOME": str(home)}
    result = helpers.run(MNIST, ["--dry-run"], tmp_path, env=env)
    assert_one_line_error(result, "mnist_siamese.py", '"tensorflw"', str(home / "keras.json"))


def test_a_backend_that_cannot_train_is_refused(tmp_path):
    result = helpers.run(MNIST, ["--dry-run"], tmp_path, env={"KERAS_BACKEND": "numpy"})
    assert_one_line_error(result, "mnist_siamese.py", "cannot train", "tensorflow, jax or torch")


@pytest.mark.skipif(importlib.util.find_spec("torch") is not None, reason="torch is installed")
def test_a_backend_whose_library_is_missing_says_what_to_install(tmp_path):
    result = helpers.run(MNIST, ["--dry-run"], tmp_path, env={"KERAS_BACKEND": "torch"})
    assert_one_line_error(result, "mnist_siamese.py", "pip install torch")


# ---------------------------------------------------------------------------
# The output folder and resuming
# ---------------------------------------------------------------------------


@pytest.mark.slow
def test_a_file_named_logs_is_refused_before_training(tmp_path, capfd):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "logs").write_text("my notes")
    args = [*MNIST_RUN, *IN_PROCESS_THREADS, "--output-dir", "run"]
    result = helpers.run_main(mnist_siamese, args, tmp_path, capfd)
    assert_one_line_error(result, "mnist_siamese.py", "holds a file named logs", "move it")
    assert sorted(path.name for path in (tmp_path / "run").iterdir()) == ["logs"]
    assert (tmp_path / "run" / "logs").read_text() == "my notes"


def test_outputs_of_the_wrong_kind_are_refused(tmp_path):
    (tmp_path / "metrics.json").mkdir()
    with pytest.raises(ValueError, match="holds a folder named metrics.json"):
        run_folder.prepare_output_dir(tmp_path)
    (tmp_path / "metrics.json").rmdir()
    (tmp_path / "backup").write_text("")
    with pytest.raises(ValueError, match="holds a file named backup"):
        run_folder.prepare_output_dir(tmp_path)


@pytest.mark.slow
def test_resume_on_a_finished_mnist_run(mnist_run, tmp_path, capfd):
    # A copy of the module's finished run, made by `args` (the fixture checked it succeeded).
    args = [*MNIST_RUN, "--output-dir", "run"]
    shutil.copytree(mnist_run / "run", tmp_path / "run")
    metrics = (tmp_path / "run" / "metrics.json").read_bytes()
    # The same command again, as a scheduler's retry: nothing to do, success (a process's
    # exit code and its whole stderr).
    again = helpers.run(MNIST, [*args, "--resume"], tmp_path)
    assert again.returncode == 0, describe(again)
    assert again.stderr == "", describe(again)
    assert "nothing to resume: the run in run finished, after 1 epoch" in again.stdout
    # More epochs: refused, saying why and what to do.
    longer = helpers.run_main(mnist_siamese, [*args, "--resume", "--epochs", "3"], tmp_path, capfd)
    assert_one_line_error(
        longer, "mnist_siamese.py", "cannot be taken to --epochs 3", "--overwrite"
    )
    assert (tmp_path / "run" / "metrics.json").read_bytes() == metrics


def test_check_not_finished_rules(tmp_path):
    run_folder.check_not_finished(tmp_path, 5)  # no run: nothing to say
    (tmp_path / "metrics.json").write_text("{damaged")
    run_folder.check_not_finished(tmp_path, 5)  # prepare_output_dir decides
    (tmp_path / "metrics.json").write_text(json.dumps({"epochs": 2}))
    for epochs in (None, 1, 2):
        with pytest.raises(command_line.NothingToDo, match="after 2 epochs"):
            run_folder.check_not_finished(tmp_path, epochs)
    with pytest.raises(ValueError, match="cannot be taken to --epochs 3"):
        run_folder.check_not_finished(tmp_path, 3)


# Run by `python -c`: the script, interrupted right after its first epoch's row is logged,
# before that epoch's backup.
INTERRUPT_BEFORE_FIRST_BACKUP = """
import os, runpy, signal, sys
from siamese_support import devices

with devices.quiet_tensorflow_start():  # the script's own imports, as quiet
    from siamese_support import run_folder

made = run_folder.training_callbacks

def interrupting_callbacks(*args, **kwargs):
    callbacks = made(*args, **kwargs)
    logger = callbacks[0]  # the epoch's row, written before the backup
    log_row = logger.on_epoch_end

    def on_epoch_end(*args, **kwargs):
        log_row(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGINT)

    logger.on_epoch_end = on_epoch_end
    return callbacks

run_folder.training_callbacks = interrupting_callbacks
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.slow
def test_ctrl_c_before_a_first_backup_leaves_nothing_behind(tmp_path):
    args = [*MNIST_RUN, "--output-dir", "new/run"]
    result = helpers.run(MNIST, args, tmp_path, python_code=INTERRUPT_BEFORE_FIRST_BACKUP)
    line = assert_one_line_error(result, "mnist_siamese.py", code=130)
    assert "nothing to resume" in line
    assert list(tmp_path.iterdir()) == []  # the folders it made went too


@pytest.mark.slow
def test_ctrl_c_before_a_first_backup_keeps_what_was_in_the_folder(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    args = [*MNIST_RUN, "--output-dir", "run"]
    result = helpers.run(MNIST, args, tmp_path, python_code=INTERRUPT_BEFORE_FIRST_BACKUP)
    assert_one_line_error(result, "mnist_siamese.py", "nothing to resume", code=130)
    assert [path.name for path in (tmp_path / "run").iterdir()] == ["notes.txt"]


# ---------------------------------------------------------------------------
# compare and search
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mnist_run(tmp_path_factory):
    """A finished MNIST run and two digit images saved from the fixture."""
    import numpy as np
    from PIL import Image

    folder = tmp_path_factory.mktemp("mnist_run")
    result = helpers.run(MNIST, [*MNIST_RUN, "--output-dir", "run"], folder)
    assert result.returncode == 0, describe(result)
    with np.load(FIXTURE) as data:
        for index in range(2):
            Image.fromarray(data["x_test"][index]).save(folder / f"digit{index}.png")
    return folder


@pytest.mark.slow
def test_compare_output_into_a_new_folder_is_created(mnist_run, tmp_path, capfd):
    pairs = tmp_path / "pairs.csv"
    pairs.write_text(f"{mnist_run / 'digit0.png'},{mnist_run / 'digit1.png'}\n")
    output = tmp_path / "new" / "folder" / "compared.csv"
    args = ["compare", "--run-dir", mnist_run / "run", "--pairs", pairs, "--output", output]
    result = helpers.run_main(mnist_siamese, args, tmp_path, capfd)
    assert result.returncode == 0, describe(result)
    assert output.read_text().startswith("image_a,")
    (tmp_path / "a_file").write_text("")
    args[-1] = tmp_path / "a_file" / "compared.csv"
    result = helpers.run_main(mnist_siamese, args, tmp_path, capfd)
    assert_one_line_error(result, "mnist_siamese.py compare", "a_file is a file", "--output")


@pytest.mark.slow
def test_a_truncated_keras_file_is_called_damaged(mnist_run, tmp_path, capfd):
    run = tmp_path / "run"
    shutil.copytree(mnist_run / "run", run)
    model = run / "embedding_network.keras"
    model.write_bytes(model.read_bytes()[:3000])
    args = ["compare", "--run-dir", run, mnist_run / "digit0.png", mnist_run / "digit1.png"]
    result = helpers.run_main(mnist_siamese, args, tmp_path, capfd)
    line = assert_one_line_error(result, "mnist_siamese.py compare", str(model))
    assert "damaged or incomplete" in line and "not found" not in line.lower()


def test_whole_zip_file(tmp_path):
    import zipfile

    archive = tmp_path / "model.keras"
    with zipfile.ZipFile(archive, "w") as stream:
        stream.writestr("config.json", "{}" * 1000)
    assert trained_model.whole_zip_file(archive)
    archive.write_bytes(archive.read_bytes()[:-30])
    assert not trained_model.whole_zip_file(archive)
    assert not trained_model.whole_zip_file(tmp_path / "missing.keras")
