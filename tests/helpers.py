"""What the test modules share: the repository's files, running a script, checking its error.

- `run(script, args, cwd)` runs `python SCRIPT ARGS` in a subprocess from `cwd`, as a user
  would, and returns the finished process; `start` and `finish` are its two halves, for a
  test that does something while the script runs (interrupts it, for one).
- `run_main(module, args, cwd, capsys)` runs a script's `main(ARGS)` in the test process
  instead, which spares the subprocess's imports (5 s or more), and returns the same kind
  of finished process.
- `assert_one_line_error(result, prog, *hints)` checks what a user must see when a command
  fails: its exit code and one line on stderr, without a traceback.
- `RUN_WITHOUT_TENSORFLOW`, given to `run` as its `python_code`, runs the script where
  TensorFlow cannot be imported, as where it is not installed.
"""

import importlib.util
import os
import pathlib
import signal
import subprocess
import sys
import textwrap

REPOSITORY = pathlib.Path(__file__).resolve().parent.parent
MNIST = REPOSITORY / "mnist_siamese.py"
TRIPLET = REPOSITORY / "triplet_totally_looks_like.py"
TOOLS = REPOSITORY / "tools"
FIXTURE = REPOSITORY / "data" / "mnist-tiny.npz"  # 5,000 training and 1,000 test digits

# Runs a script as `python SCRIPT ARGS` would, in a process where TensorFlow cannot be
# imported, as where it is not installed (Keras then does without it too).
RUN_WITHOUT_TENSORFLOW = textwrap.dedent(
    """
    import runpy, sys

    class NoTensorFlow:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "tensorflow":
                raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")

    sys.meta_path.insert(0, NoTensorFlow())
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
    """
)


def default_signal_handling():
    """`preexec_fn` of every script started: SIGINT and SIGTERM at their defaults.

    A suite started as a background job (`bash .ci/run &`) runs with SIGINT ignored, and a
    child inherits that: Python then never raises KeyboardInterrupt, and a test of Ctrl-C
    would test the shell that started the suite instead of the script.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def start(
    script, args, cwd, python_code=None, env=None, stdout=subprocess.PIPE, stderr=subprocess.PIPE
):
    """Start `python SCRIPT ARGS` in `cwd`, or `python -c PYTHON_CODE SCRIPT ARGS`.

    Code given as `python_code` finds the script's path in `sys.argv[1]` and the arguments
    after it, and imports the repository's modules (the repository is on its PYTHONPATH).
    `env` adds environment variables to the test process's own. Standard output and error
    are captured as text unless `stdout` or `stderr` say where else they go.
    """
    environment = {**os.environ, **(env or {})}
    if python_code is None:
        command = [sys.executable, str(script)]
    else:
        command = [sys.executable, "-c", python_code, str(script)]
        paths = [str(REPOSITORY), environment.get("PYTHONPATH", "")]
        environment["PYTHONPATH"] = os.pathsep.join(path for path in paths if path)
    return subprocess.Popen(
        [*command, *map(str, args)],
        cwd=cwd,
        env=environment,
        stdout=stdout,
        stderr=stderr,
        text=True,
        preexec_fn=default_signal_handling,
    )


def finish(process, timeout=300):
    """Wait for a process from `start`; return it as a CompletedProcess (kill it on timeout)."""
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        raise
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def run(script, args, cwd, python_code=None, env=None, timeout=300):
    """`start` the script (or the code) and `finish` it: the finished process."""
    return finish(start(script, args, cwd, python_code, env), timeout)


def run_main(module, args, cwd, capsys):
    """`module.main(ARGS)` in the test process, from `cwd`, as a finished process.

    `main()` returns the exit code the script exits with (a mistake on the command line ends
    in SystemExit, as it does in the script); stdout and stderr come from pytest's `capsys`.
    """
    args = [str(arg) for arg in args]
    capsys.readouterr()
    previous = os.getcwd()
    os.chdir(cwd)
    try:
        code = module.main(args)
    except SystemExit as exit:
        code = exit.code
    finally:
        os.chdir(previous)
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, captured.out, captured.err)


def same_threads():
    """Options that keep TensorFlow's thread setting as it is, for an MNIST `main()` run in
    the test process: a run sets it for its whole process (1 on a CPU), which would outlive
    the test there. A subprocess given them uses the setting the test process keeps."""
    import keras

    return ["--intra-op-threads", "0"] if keras.backend.backend() == "tensorflow" else []


def describe(result, tail=3000):
    """A finished process's exit code, the end of its stdout and its stderr, for a failure."""
    return f"exit {result.returncode}\nstdout:\n{result.stdout[-tail:]}\nstderr:\n{result.stderr}"


def assert_one_line_error(result, prog, *hints, code=2, warnings=False):
    """Exit `code`, no traceback, one stderr line `PROG: error: ...` naming every hint.

    Exit codes other than 2 (130 for Ctrl-C, 143 for SIGTERM) have a line `PROG: ...`.
    With `warnings`, lines `warning: ...` (the triplet script's, one per unreadable image)
    may come before it. Returns the line.
    """
    assert result.returncode == code, describe(result)
    assert "Traceback" not in result.stderr, describe(result)
    lines = result.stderr.strip().splitlines()
    if warnings:
        lines = [line for line in lines if not line.startswith("warning: ")]
    assert len(lines) == 1, describe(result)
    prefix = f"{prog}: error: " if code == 2 else f"{prog}: "
    assert lines[0].startswith(prefix), describe(result)
    assert len(lines[0]) > len(prefix) + 10, lines[0]  # says something
    for hint in hints:
        assert hint in lines[0], (hint, lines[0])
    return lines[0]


def installed(backend):
    """Whether the library of a Keras backend ("tensorflow", "jax", "torch") is installed."""
    return importlib.util.find_spec(backend) is not None


def needs(*backends):
    """A skip mark, with its reason, for a test whose backends are not all installed here."""
    import pytest

    missing = [backend for backend in backends if not installed(backend)]
    return pytest.mark.skipif(bool(missing), reason=f"not installed here: {', '.join(missing)}")
