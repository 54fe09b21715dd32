"""Shared by the test modules: starting a script as the user would."""

import os
import pathlib
import signal
import subprocess
import sys


def default_signal_handling():
    """`preexec_fn` for a script that a test will interrupt: SIGINT and SIGTERM at default.

    A suite started as a background job (`bash .ci/run &`) runs with SIGINT ignored, and a
    child inherits that: Python then never raises KeyboardInterrupt, and a test of Ctrl-C
    would test the shell that started the suite instead of the script.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def start(script, args, cwd, python_code=None):
    """Start `python script ARGS` (or `python -c python_code REPOSITORY ARGS`) in `cwd`.

    Its output is captured as text, and it starts with default signal handling.
    """
    if python_code is None:
        command = [sys.executable, str(script)]
    else:  # the code gets the repository's path as its first argument
        command = [sys.executable, "-c", python_code, str(pathlib.Path(script).parent)]
    return subprocess.Popen(
        [*command, *map(str, args)],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
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


def describe(result, tail=3000):
    """A finished process's exit code, the end of its stdout and its stderr, for a failure."""
    return f"exit {result.returncode}\nstdout:\n{result.stdout[-tail:]}\nstderr:\n{result.stderr}"


def assert_one_line_error(result, prog, *hints):
    """Exit code 2, no traceback, one stderr line `PROG: error: ...` naming every hint."""
    assert result.returncode == 2, describe(result)
    assert "Traceback" not in result.stderr, describe(result)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, describe(result)
    assert lines[0].startswith(f"{prog}: error: "), describe(result)
    for hint in hints:
        assert hint in lines[0], (hint, lines[0])


def run_main(script_module, args, cwd, capsys):
    """`script_module.main(ARGS)` in the test process, from `cwd`, as a finished process.

    `main()` returns the exit code the script exits with; stdout and stderr come from
    pytest's `capsys`. It spares a test the subprocess's imports (5 s or more).
    """
    previous = os.getcwd()
    os.chdir(cwd)
    try:
        code = script_module.main([str(arg) for arg in args])
    finally:
        os.chdir(previous)
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, captured.out, captured.err)
