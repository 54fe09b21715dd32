"""Shared by the test modules: starting a script as the user would."""

import signal


def default_signal_handling():
    """`preexec_fn` for a script that a test will interrupt: SIGINT and SIGTERM at default.

    A suite started as a background job (`bash .ci/run &`) runs with SIGINT ignored, and a
    child inherits that: Python then never raises KeyboardInterrupt, and a test of Ctrl-C
    would test the shell that started the suite instead of the script.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
