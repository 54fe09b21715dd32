"""Run a command several times under `/usr/bin/time -v`; print wall time and peak memory.

    python benchmarks/timed.py --runs 3 -- python mnist_siamese.py --data mnist.npz

Each run's whole-process wall time and peak resident memory (`/usr/bin/time -v`'s
"Maximum resident set size") are printed, then the median of each. A run that fails stops
the measurement.
"""

import argparse
import re
import statistics
import subprocess
import sys


def measure(command):
    """Run `command` once under /usr/bin/time -v; return (seconds, peak MB, stdout)."""
    result = subprocess.run(
        ["/usr/bin/time", "-v", *command], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"{command} exited {result.returncode}: {result.stderr[-500:]}")
    clock = re.search(r"Elapsed \(wall clock\) time .*: (?:(\d+):)?(\d+):([\d.]+)", result.stderr)
    hours, minutes, seconds = clock.groups()
    wall = int(hours or 0) * 3600 + int(minutes) * 60 + float(seconds)
    peak_kilobytes = int(
        re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr)[1]
    )
    return wall, peak_kilobytes / 1024, result.stdout


def main(argv=None):
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="how many runs (default 3)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to measure after --")
    walls, peaks = [], []
    for run in range(1, args.runs + 1):
        wall, peak, stdout = measure(command)
        walls.append(wall)
        peaks.append(peak)
        last_line = stdout.strip().splitlines()[-1] if stdout.strip() else ""
        print(f"run {run}: wall {wall:.2f} s, peak RSS {peak:.0f} MB | {last_line}", flush=True)
    print(
        f"median of {args.runs}: wall {statistics.median(walls):.2f} s, "
        f"peak RSS {statistics.median(peaks):.0f} MB"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
