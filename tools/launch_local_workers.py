"""Start N local processes of one command as a multi-process run, to try it on one machine.

    python tools/launch_local_workers.py 2 -- python mnist_siamese.py --distribute multi-process

Each process gets the variables that `keras.distribution.initialize()` reads:
`KERAS_DISTRIBUTION_JOB_ADDRESSES` (a free loopback port per process, the first one the
coordinator's), `KERAS_DISTRIBUTION_NUM_PROCESSES` and `KERAS_DISTRIBUTION_PROCESS_ID`, and
`KERAS_BACKEND=jax` unless the environment names a backend. Every line a process prints is
shown with its index, `[0] ...`, on the stream it was written to. When one process fails,
the others are stopped (SIGTERM, then SIGKILL after --grace seconds): a multi-process run
cannot go on without all of its processes. Ctrl-C and SIGTERM are passed on to every
process, which stops by itself (each says what it kept, and whether `--resume` goes on);
one still running after --grace seconds is stopped as above. The launcher then says
`[launcher] interrupted: stopped the N processes` (`terminated: ...` after SIGTERM) and
exits with 130 (143). Otherwise the exit code is 0 when all succeed, else the first
failure's.

On several machines, set the three variables on each machine yourself (the same address
list everywhere) and start the command there.
"""

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time


def free_loopback_ports(count):
    """`count` distinct TCP ports on 127.0.0.1 that nothing listens on right now."""
    sockets = []
    try:
        for _ in range(count):
            handle = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            handle.bind(("127.0.0.1", 0))
            sockets.append(handle)
        return [handle.getsockname()[1] for handle in sockets]
    finally:
        for handle in sockets:
            handle.close()


def process_environment(index, count, ports):
    """The environment of process `index` of `count`."""
    environment = dict(os.environ)
    environment.setdefault("KERAS_BACKEND", "jax")
    environment["KERAS_DISTRIBUTION_JOB_ADDRESSES"] = ",".join(
        f"127.0.0.1:{port}" for port in ports
    )
    environment["KERAS_DISTRIBUTION_NUM_PROCESSES"] = str(count)
    environment["KERAS_DISTRIBUTION_PROCESS_ID"] = str(index)
    environment["PYTHONUNBUFFERED"] = "1"  # lines appear as they are printed
    return environment


def copy_lines(stream, index, destination, lock):
    """Copy `stream` to `destination` line by line, each prefixed with `[index] `."""
    for line in iter(stream.readline, ""):
        with lock:
            destination.write(f"[{index}] {line}")
            destination.flush()
    stream.close()


def describe_exit(code):
    """An exit code in words: a negative code is the signal that ended the process."""
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def stop(processes, grace):
    """SIGTERM every process still running; SIGKILL those left after `grace` seconds."""
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for process in processes:
        try:
            process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def launch(count, command, grace=30.0):
    """Run `command` in `count` processes as described above; return the exit code."""
    ports = free_loopback_ports(count)
    lock = threading.Lock()
    processes, copiers = [], []
    # The first Ctrl-C or SIGTERM while processes start or run: (signal, when, how many run).
    interrupt, starting = [], [True]

    def pass_on(signum, frame):
        running = [process for process in processes if process.poll() is None]
        if not interrupt and (running or starting):
            interrupt.append((signum, time.monotonic(), len(running)))
        for process in running:
            process.send_signal(signum)

    # Set before the first process starts, so that none is left running by a Ctrl-C there.
    previous = {
        number: signal.signal(number, pass_on) for number in (signal.SIGINT, signal.SIGTERM)
    }
    result = 0
    try:
        for index in range(count):
            if interrupt:
                break  # the processes started so far have the signal
            process = subprocess.Popen(
                command,
                env=process_environment(index, count, ports),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                bufsize=1,
                start_new_session=True,  # Ctrl-C reaches the launcher, which passes it on once
            )
            processes.append(process)
            for stream, destination in (
                (process.stdout, sys.stdout),
                (process.stderr, sys.stderr),
            ):
                copier = threading.Thread(
                    target=copy_lines, args=(stream, index, destination, lock), daemon=True
                )
                copier.start()
                copiers.append(copier)
        starting.clear()
        running = set(range(len(processes)))
        while running:
            ended = [index for index in sorted(running) if processes[index].poll() is not None]
            running.difference_update(ended)
            # A process killed by a signal is more likely the cause than one that failed
            # because it lost a partner in the same moment: it is named first.
            ended.sort(key=lambda index: processes[index].returncode >= 0)
            for index in ended:
                code = processes[index].returncode
                if code != 0 and result == 0:
                    result = code if code > 0 else 128 - code
                    if interrupt:
                        continue  # each process stops on its own (below), and says so
                    others = ", ".join(map(str, sorted(running))) or "none left"
                    with lock:
                        print(
                            f"[launcher] process {index} {describe_exit(code)}; stopping "
                            f"the others ({others})",
                            file=sys.stderr,
                            flush=True,
                        )
                    stop(processes, grace)
            # After a Ctrl-C, each process removes what it has to by itself: a SIGTERM in
            # the middle could cut that short. Only one still running after --grace is stopped.
            if interrupt and running and time.monotonic() - interrupt[0][1] > grace:
                stop(processes, grace)
            time.sleep(0.1)
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        stop(processes, grace)
        for copier in copiers:
            copier.join(timeout=5)
    # Processes that all succeeded had finished before the signal could stop them.
    if interrupt and (result != 0 or not processes):
        signum, _, stopped = interrupt[0]
        word = "terminated" if signum == signal.SIGTERM else "interrupted"
        did = f"stopped the {stopped} process{'es' if stopped != 1 else ''}"
        # Each process has said what it kept and how to resume: this line adds what the
        # launcher did, after theirs.
        print(
            f"[launcher] {word}: {did if stopped else 'no process was started'}",
            file=sys.stderr,
            flush=True,
        )
        return 143 if signum == signal.SIGTERM else 130
    return result


def main(argv=None):
    """The command line: `N [--grace SECONDS] -- COMMAND...`; returns the exit code."""
    parser = argparse.ArgumentParser(
        description="Start N local processes of COMMAND as one multi-process run.",
        usage="%(prog)s [--grace SECONDS] N -- COMMAND...",
    )
    parser.add_argument("count", metavar="N", type=int, help="how many processes")
    parser.add_argument(
        "--grace",
        type=float,
        default=30.0,
        help="seconds a process is given to stop after SIGTERM before it is killed (30)",
    )
    argv = sys.argv[1:] if argv is None else list(argv)
    # Everything after the first "--" is the command, options of its own included.
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    command = argv[split + 1 :]
    if args.count < 1:
        parser.error(f"N must be at least 1, got {args.count}")
    if not command:
        parser.error("no command given: put it after --")
    try:
        return launch(args.count, command, args.grace)
    except OSError as error:
        parser.exit(2, f"{parser.prog}: error: cannot start {command[0]}: {error.strerror}\n")


if __name__ == "__main__":
    sys.exit(main())
