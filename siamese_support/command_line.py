"""The scripts' command lines, and errors reported in one line with exit code 2.

Both parsers live here rather than in the scripts so that `--help` and a mistyped option
answer before Keras imports TensorFlow (about 5 s): a script reads its command line first,
then imports Keras. The defaults are the tutorials' and come from the scripts.
"""

import _thread
import argparse
import atexit
import contextlib
import functools
import math
import os
import pathlib
import signal
import sys
import threading

# `--negatives` of the triplet script: the tutorial's random negatives, or negatives mined in
# each batch by `siamese_support.mining` (named here, where no import of Keras is needed).
NEGATIVES_CHOICES = ("random", "semi-hard", "hard")
# The triplet margin with `--normalize`: FaceNet's, for embeddings of unit length (squared
# distances from 0 to 4), where the example's 0.5 is an eighth of the whole range.
NORMALIZED_MARGIN = 0.2
# Where the runs go unless --output-dir says otherwise: (a run's, a --dry-run's).
MNIST_OUTPUT_DIRS = ("runs/mnist_siamese", "runs/mnist_siamese_dry_run")
TRIPLET_OUTPUT_DIRS = ("runs/triplet_totally_looks_like", "runs/triplet_totally_looks_like_dry_run")
# Every file a triplet run writes in its output folder (`--overwrite` removes only these).
TRIPLET_OUTPUT_FILES = ("metrics.json", "embedding.keras", "history.csv", "history-progress.csv")
TRIPLET_OUTPUT_FILES += ("split.json", "settings.json", "similarities.csv", "triplets.png")
TRIPLET_OUTPUT_FILES += ("loss.png", "distances.png", "retrieval.png")
# The triplet settings a resumed run must keep (--epochs, --jit-compile, --distribute,
# --steps-per-execution may change), and all that its metrics.json records.
TRIPLET_RESUMED_SETTINGS = ("image_size", "batch_size", "margin", "learning_rate", "weights")
TRIPLET_RESUMED_SETTINGS += ("negatives", "normalize", "cache_features", "mixed_precision")
TRIPLET_RUN_SETTINGS = TRIPLET_RESUMED_SETTINGS + ("seed", "jit_compile", "replicas", "dry_run")
TRIPLET_RUN_SETTINGS += ("steps_per_execution",)
# What an MNIST run's metrics.json records of its command line (after the script's choices).
MNIST_RUN_SETTINGS = ("network", "intra_op_threads", "steps_per_execution", "margin", "seed")
MNIST_RUN_SETTINGS += ("dry_run",)


class DownloadError(RuntimeError):
    """A download failed: no network, or the server did not deliver the file."""


def one_line(error):
    """The first line of an exception's message (its type's name when the message is empty)."""
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]


class ArgumentParser(argparse.ArgumentParser):
    """An argument parser that reports a mistake in one line and exits with code 2.

    Abbreviated options are refused: with flags as alike as `--data` and `--data-dir`, or
    `--epoch` and `--epochs`, a prefix that argparse would complete hides a typo.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


class NothingToDo(Exception):
    """The command asked for work that is done already: its message, and exit code 0."""


class ProcessLost(RuntimeError):
    """Another process of a multi-process run stopped: this one cannot go on (exit code 1)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, as schedulers (Slurm, Kubernetes) stop a job: handled like Ctrl-C."""


class ExitStatus:
    """The exit code of the block run under `one_line_errors`."""

    code = 0


def interrupt_behind(error):
    """The Ctrl-C or SIGTERM that `error` was raised while handling, or None.

    A signal can arrive while a library is inside a `with` block of its own (TensorFlow's
    device scopes, for one); the library's clean-up may then fail with an error of its own,
    raised "during handling of" the interrupt. The user asked to stop: that is what counts.
    """
    seen = 0
    while error is not None and seen < 20:
        if isinstance(error, KeyboardInterrupt):
            return error
        error, seen = error.__context__, seen + 1
    return None


def process_lost_behind(interrupt):
    """The `ProcessLost` that a plain Ctrl-C or SIGTERM arrived while reporting, or None.

    When a process of a multi-process run dies, the launcher stops the others with SIGTERM
    at once; one that has found the loss itself may get the signal while its report is on
    its way out (its run folder released), and that report says more: what happened and
    that `--resume` goes on. An interrupt with a message of its own has said that already.
    """
    if interrupt is None or str(interrupt):
        return None
    error, seen = interrupt.__context__, 0
    while error is not None and seen < 20:
        if isinstance(error, ProcessLost):
            return error
        error, seen = error.__context__, seen + 1
    return None


def _raise_terminated(signum, frame):
    raise Terminated


@contextlib.contextmanager
def _interrupts_ignored(in_main_thread):
    """Ctrl-C and SIGTERM ignored in the block (signals reach the main thread only)."""
    previous = {}
    if in_main_thread:
        for number in (signal.SIGINT, signal.SIGTERM):
            previous[number] = signal.signal(number, signal.SIG_IGN)
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, signal.SIG_DFL if handler is None else handler)


@contextlib.contextmanager
def one_line_errors(prog, interrupted="interrupted"):
    """Turn the errors a user can cause into one line on stderr and an exit code.

    `ValueError`, `OSError` and `DownloadError` give exit code 2, `ProcessLost` 1, and
    `NothingToDo` 0 with its message on stdout. Ctrl-C
    gives 130 and SIGTERM 143, the shell's codes for the two signals, each with its message
    (the scripts say how to resume; `interrupted` is said otherwise). Inside the block
    SIGTERM raises `Terminated`, unless it was set to be ignored. Yields an `ExitStatus`
    whose `code` holds the result.
    """
    status = ExitStatus()
    previous = None
    in_main_thread = threading.current_thread() is threading.main_thread()
    if in_main_thread and signal.getsignal(signal.SIGTERM) is not signal.SIG_IGN:
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield status
    except (KeyboardInterrupt, Exception) as error:
        # The report is on its way out: a signal now (the launcher's SIGTERM, once another
        # process has died) would end it in a traceback.
        with _interrupts_ignored(in_main_thread):
            interrupt = interrupt_behind(error)
            lost = process_lost_behind(interrupt)
            if lost is not None:  # the signal came while the loss of a process was reported
                error, interrupt = lost, None
            if interrupt is not None:
                terminated = isinstance(interrupt, Terminated)
                default = "terminated" if terminated else interrupted
                print(f"{prog}: {str(interrupt) or default}", file=sys.stderr)
                status.code = 143 if terminated else 130
            elif isinstance(error, NothingToDo):
                print(f"{prog}: {error}", flush=True)
            elif isinstance(error, ProcessLost):
                print(f"{prog}: {error}", file=sys.stderr)
                status.code = 1
            elif isinstance(error, (ValueError, OSError, DownloadError)):
                print(f"{prog}: error: {one_line(error)}", file=sys.stderr)
                status.code = 2
            else:
                raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


# What `quiet_interrupts_outside_main` set up: the program's name and a copy of stderr.
_outside_main = {}


def quiet_interrupts_outside_main(module_name, prog):
    """Ctrl-C before `main` starts, or after it returns: one line and exit code 130.

    A script spends its first seconds importing Keras and TensorFlow (or JAX), and its last
    ones in their clean-up, where a KeyboardInterrupt would end in a traceback and death by
    the signal. Nothing has been written before `main` and everything after it, so the
    handler exits at once (`os._exit`): unwinding an import stopped half-way can print more
    errors or hang. It writes to a copy of stderr, since the quiet start silences stderr.
    Only for a script run from the shell (`module_name == "__main__"`), where Ctrl-C is not
    ignored; `reports_errors` restores Python's handling while `main` runs. For the whole
    process, an interrupt that Python drops is signalled again (`_deliver_lost_interrupt`).
    """
    in_main_thread = threading.current_thread() is threading.main_thread()
    if module_name != "__main__" or not in_main_thread:
        return
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        return
    _outside_main.update(prog=prog, stderr=os.dup(2), when="while starting; nothing was written")
    signal.signal(signal.SIGINT, _exit_at_once)
    # Registered before Keras's import, this runs after the libraries' own exit handlers:
    # past it Python resets the handler to the default, and Ctrl-C would kill the process
    # by the signal while TensorFlow's C++ objects are destroyed (half a second); ignored.
    atexit.register(signal.signal, signal.SIGINT, signal.SIG_IGN)
    sys.unraisablehook = functools.partial(_deliver_lost_interrupt, sys.unraisablehook)


def _deliver_lost_interrupt(previous_hook, unraisable):
    """`sys.unraisablehook`: a Ctrl-C or SIGTERM that Python had to drop is signalled again.

    Python cannot raise out of a garbage collector's callback (JAX registers one) or a
    `__del__`: an interrupt raised there is printed as "Exception ignored" and lost, and the
    process goes on, into a multi-process run's join, to wait for processes that stopped
    (seen after a launcher's Ctrl-C in the first seconds). Signalled to the main thread
    again a moment later, from another thread (from here, it would land in this hook), it
    reaches ordinary code. Other errors go to `previous_hook`.
    """
    if isinstance(unraisable.exc_value, KeyboardInterrupt):
        terminated = isinstance(unraisable.exc_value, Terminated)
        signum = signal.SIGTERM if terminated else signal.SIGINT
        if hasattr(signal, "pthread_kill"):  # wakes a main thread that waits in a system call
            main_thread = threading.main_thread().ident
            again = threading.Timer(0.05, signal.pthread_kill, args=(main_thread, signum))
        else:
            again = threading.Timer(0.05, _thread.interrupt_main, args=(signum,))
        again.daemon = True
        again.start()
        return
    previous_hook(unraisable)


def _exit_at_once(signum, frame):
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    line = f"{_outside_main['prog']}: interrupted {_outside_main['when']}\n"
    with contextlib.suppress(OSError):
        os.write(_outside_main["stderr"], line.encode())
    os._exit(130)


def reports_errors(prog):
    """Decorate a script's `main` so that it returns an exit code: 0, or `one_line_errors`'.

    Around `main`, Ctrl-C raises KeyboardInterrupt as usual (see
    `quiet_interrupts_outside_main` for before and after).
    """

    def decorate(main):
        @functools.wraps(main)
        def main_with_one_line_errors(*args, **kwargs):
            quiet = signal.getsignal(signal.SIGINT) is _exit_at_once
            try:
                with one_line_errors(prog) as status:
                    if quiet:
                        signal.signal(signal.SIGINT, signal.default_int_handler)
                    return main(*args, **kwargs)
                return status.code
            finally:
                if quiet:
                    _outside_main["when"] = "while exiting, after the work had ended"
                    signal.signal(signal.SIGINT, _exit_at_once)

        return main_with_one_line_errors

    return decorate


def whole_number(minimum):
    """An argparse type: a whole number of at least `minimum`."""

    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            kind = "a positive number" if minimum == 1 else f"at least {minimum}"
            raise argparse.ArgumentTypeError(f"must be {kind}, got {value}")
        return value

    return parse


positive_int = whole_number(1)


def number(text):
    """An argparse type: any number."""
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def positive_float(text):
    """An argparse type: a finite number above 0."""
    value = number(text)
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def fraction(text):
    """An argparse type: a number strictly between 0 and 1."""
    value = number(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1 (exclusive), got {text}")
    return value


def add_run_folder_options(parser, default_dir, dry_run_dir):
    """`--output-dir`, `--no-plots`, `--resume` and `--overwrite`, the same in both scripts."""
    add_output_options(parser, default_dir, dry_run_dir)
    add_resume_options(parser)


def add_output_options(parser, default_dir, dry_run_dir, saved="models"):
    """`--output-dir` and `--no-plots`; `saved` names what the run saves besides its history."""
    parser.add_argument(
        "--output-dir",
        type=pathlib.Path,
        metavar="DIR",
        help=f"where the {saved}, history, metrics and plots go (default {default_dir}; "
        f"{dry_run_dir} with --dry-run)",
    )
    parser.add_argument("--no-plots", action="store_true", help="write no PNG plots")


def add_resume_options(parser):
    """`--resume` and `--overwrite`."""
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted run in --output-dir from its last finished epoch",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a finished or interrupted run in --output-dir",
    )


def add_distribute_option(parser, multi_process=False):
    """`--distribute`, the same in both scripts; `multi_process` adds the MNIST script's."""
    help_text = (
        "auto mirrors training over the GPUs when more than one is visible; mirrored "
        "forces tf.distribute.MirroredStrategy (over the CPU's logical devices without a "
        "GPU); none trains on one device"
    )
    if multi_process:
        help_text += (
            "; multi-process (KERAS_BACKEND=jax) trains in several processes or machines "
            "under Keras's DataParallel, each process placed by the KERAS_DISTRIBUTION_* "
            "variables (see tools/launch_local_workers.py)"
        )
    parser.add_argument(
        "--distribute",
        choices=("auto", "none", "mirrored", "multi-process")[: 4 if multi_process else 3],
        default="auto",
        help=help_text + " (default auto)",
    )


def add_steps_per_execution_option(parser, default):
    """`--steps-per-execution`, the same in both scripts; `default`: a number, or a pair (on
    a CPU, on a GPU), as `devices.choose_steps_per_execution` takes it."""
    if isinstance(default, tuple):
        default = f"{default[0]} on a CPU, {default[1]} on a GPU"
    parser.add_argument(
        "--steps-per-execution",
        type=positive_int,
        metavar="N",
        help="training steps run per call into the compiled training loop (Keras's "
        "steps_per_execution): fewer round trips from Python; the progress bar and the "
        f"callbacks see every N-th step. At most an epoch's steps (default {default}, or "
        "an epoch's steps if fewer; always 1 under PyTorch and MirroredStrategy)",
    )


def mnist_parser(defaults):
    """The command line of `mnist_siamese.py`.

    `defaults` maps names to the script's values: `epochs`, `batch_size`, `margin`,
    `learning_rate`, `seed`, `dry_run_epochs`, `dry_run_batch_size`, `dry_run_data`,
    `steps_per_execution`.
    """
    epochs, batch_size, seed = defaults["epochs"], defaults["batch_size"], defaults["seed"]
    margin, learning_rate = defaults["margin"], defaults["learning_rate"]
    dry_run_batch_size = defaults["dry_run_batch_size"]
    parser = ArgumentParser(
        prog="mnist_siamese.py",
        description="Train a Siamese network with a contrastive loss on MNIST pairs.",
        epilog="With a trained model: mnist_siamese.py compare IMAGE_A IMAGE_B, or export "
        "RUN_DIR for serving (see mnist_siamese.py compare --help, export --help).",
    )
    parser.add_argument(
        "--epochs", type=positive_int, default=epochs, help=f"epochs (default {epochs})"
    )
    parser.add_argument(
        "--batch-size",
        type=positive_int,
        help=f"pairs per batch (default {batch_size}; {dry_run_batch_size} with --dry-run, "
        "so that its one short epoch takes enough steps to learn)",
    )
    parser.add_argument(
        "--margin",
        type=positive_float,
        default=margin,
        help="contrastive-loss margin: distance beyond which different digits cost "
        f"nothing (default {margin})",
    )
    parser.add_argument(
        "--learning-rate",
        type=positive_float,
        default=learning_rate,
        help=f"RMSprop learning rate (default {learning_rate})",
    )
    parser.add_argument(
        "--network",
        choices=("mlp", "conv"),
        default="mlp",
        help="embedding network: the example's MLP, or a small convnet (default mlp)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=seed,
        help=f"seed for pairs, weights, dropout and shuffling (default {seed})",
    )
    parser.add_argument(
        "--data",
        type=pathlib.Path,
        help="a mnist.npz-style file or a folder of the four official "
        "*-idx?-ubyte.gz files (default: download MNIST through Keras)",
    )
    parser.add_argument(
        "--limit",
        type=positive_int,
        help="use only the first N training and the first N test images",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="quick check: 1 epoch on the small MNIST subset shipped in data/ "
        "(5,000 training and 1,000 test digits), output in runs/mnist_siamese_dry_run "
        "unless --output-dir is given",
    )
    add_run_folder_options(parser, *MNIST_OUTPUT_DIRS)
    add_distribute_option(parser, multi_process=True)
    parser.add_argument(
        "--intra-op-threads",
        type=whole_number(0),
        help="threads TensorFlow gives one operation; 0 lets TensorFlow choose (default: "
        "1 for the MLP without a GPU, where it measured faster, otherwise 0; TensorFlow "
        "backend only)",
    )
    add_steps_per_execution_option(parser, defaults["steps_per_execution"])
    return parser


def image_size(minimum):
    """An argparse type: an image side of at least `minimum` pixels."""

    def parse(text):
        value = positive_int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(
                f"must be at least {minimum} (the smallest input ResNet50 accepts), got {value}"
            )
        return value

    return parse


def weights(text):
    """An argparse type: `imagenet`, `none` or a path (checked when the run starts)."""
    # "none" stays a string: None means "not given" until the dry-run defaults are applied.
    return text.lower() if text.lower() in ("imagenet", "none") else text


def triplet_parser(defaults):
    """The command line of `triplet_totally_looks_like.py`.

    `defaults` maps names to the script's values: `epochs`, `batch_size`, `margin`,
    `learning_rate`, `image_size`, `minimum_image_size`, `validation_split`, `seed`,
    `dry_run_pairs`, `dry_run_image_size`, `dry_run_epochs`, `steps_per_execution`.
    """
    parser = ArgumentParser(
        prog="triplet_totally_looks_like.py",
        description="Train a Siamese network with a triplet loss on Totally Looks Like.",
        epilog="With a trained model: triplet_totally_looks_like.py search QUERY --gallery DIR, "
        "compare IMAGE_A IMAGE_B, or export RUN_DIR for serving (see their --help).",
    )
    parser.add_argument(
        "--data-dir",
        type=pathlib.Path,
        metavar="DIR",
        help="a folder holding left/ and right/ (default: download the dataset into ~/.keras)",
    )
    parser.add_argument(
        "--weights",
        type=weights,
        metavar="{imagenet,none,PATH}",
        help="ResNet50 weights: imagenet, none (random) or the path of a local .h5 / "
        ".weights.h5 file (default imagenet; none with --dry-run)",
    )
    parser.add_argument(
        "--epochs",
        type=positive_int,
        metavar="N",
        help=f"epochs (default {defaults['epochs']}; 1 with --dry-run)",
    )
    parser.add_argument(
        "--batch-size",
        type=positive_int,
        default=defaults["batch_size"],
        metavar="N",
        help=f"triplets per batch (default {defaults['batch_size']})",
    )
    parser.add_argument(
        "--margin",
        type=positive_float,
        metavar="MARGIN",
        help=f"triplet-loss margin (default {defaults['margin']}; {NORMALIZED_MARGIN} with "
        "--normalize)",
    )
    parser.add_argument(
        "--learning-rate",
        type=positive_float,
        metavar="RATE",
        default=defaults["learning_rate"],
        help=f"Adam learning rate (default {defaults['learning_rate']})",
    )
    parser.add_argument(
        "--image-size",
        type=image_size(defaults["minimum_image_size"]),
        metavar="N",
        help=f"images are resized to N x N pixels, N >= {defaults['minimum_image_size']} "
        f"(default {defaults['image_size']}; {defaults['dry_run_image_size']} with --dry-run)",
    )
    parser.add_argument(
        "--validation-split",
        type=fraction,
        metavar="FRACTION",
        default=defaults["validation_split"],
        help=f"fraction of the pairs held out for validation (default "
        f"{defaults['validation_split']})",
    )
    parser.add_argument(
        "--seed",
        type=int,
        metavar="N",
        default=defaults["seed"],
        help=f"seed for the split, negatives, shuffles and weights (default {defaults['seed']})",
    )
    parser.add_argument(
        "--limit",
        type=positive_int,
        metavar="N",
        help="use only the first N pairs (sorted by name)",
    )
    parser.add_argument(
        "--negatives",
        choices=NEGATIVES_CHOICES,
        default="random",
        help="random: one random image of another pair per anchor, as the example draws "
        "them; semi-hard: the closest image of another pair in the batch that is farther "
        "from the anchor than its positive (FaceNet); hard: the closest image of another "
        "pair in the batch (default random)",
    )
    parser.add_argument(
        "--normalize",
        action="store_true",
        help="scale each embedding to unit length (L2), as FaceNet does, so that squared "
        f"distances lie between 0 and 4 (default off, as in the example; the margin is then "
        f"{NORMALIZED_MARGIN} unless --margin says otherwise)",
    )
    # --resume and --overwrite come last in this script's --help, as they always have.
    add_output_options(parser, *TRIPLET_OUTPUT_DIRS, saved="model")
    parser.add_argument(
        "--cache-features",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run the frozen part of ResNet50 once per image and train the rest on its "
        "cached features (default on; --no-cache-features runs the whole network every "
        "step)",
    )
    parser.add_argument(
        "--mixed-precision",
        action=argparse.BooleanOptionalAction,
        help="compute in float16, keep weights, distances and loss in float32 (default: on "
        "when the Keras backend sees a GPU, off otherwise)",
    )
    parser.add_argument(
        "--jit-compile",
        action=argparse.BooleanOptionalAction,
        help="compile the training step with XLA (default: Keras decides, on with a GPU)",
    )
    add_steps_per_execution_option(parser, defaults["steps_per_execution"])
    add_distribute_option(parser, multi_process=True)
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help=f"quick offline check: {defaults['dry_run_pairs']} generated pairs in a "
        f"temporary folder (or --data-dir), {defaults['dry_run_image_size']} x "
        f"{defaults['dry_run_image_size']} images, weights none, 1 epoch; explicit flags "
        "still apply",
    )
    add_resume_options(parser)
    return parser


def split_command(argv, commands):
    """`(command, rest)`: the first argument when it is one of `commands`, else `(None, argv)`.

    A script's bare command line trains, as the tutorial does; `compare`, `search` and
    `export` use what a run trained. `argv` None reads the process's arguments.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in commands:
        return argv[0], argv[1:]
    return None, argv


def add_run_dir_option(parser, default_dir, dry_run_dir):
    """`--run-dir`: the finished run whose model a `compare` or `search` uses."""
    parser.add_argument(
        "--run-dir",
        type=pathlib.Path,
        metavar="DIR",
        default=pathlib.Path(default_dir),
        help=f"the training run's output folder (default {default_dir}; a --dry-run's "
        f"is {dry_run_dir})",
    )


# `export --format`: the formats of Keras's `Model.export` that `siamese_support.export`
# writes and checks (named here, where no import of Keras is needed).
EXPORT_FORMATS = ("tf_saved_model", "onnx")


def export_parser(script, default_dir, dry_run_dir):
    """The command line of `SCRIPT export`: a run's embedding model for serving."""
    parser = ArgumentParser(
        prog=f"{script} export",
        description="Export a trained run's embedding model for serving, with Keras's "
        "Model.export: tf_saved_model (a folder, for TensorFlow Serving and tf.saved_model."
        "load) or onnx (a file, for ONNX Runtime). The export is reloaded by its own "
        "runtime and kept only if it gives the Keras model's embeddings for a few images.",
    )
    parser.add_argument(
        "run_dir",
        type=pathlib.Path,
        nargs="?",
        default=pathlib.Path(default_dir),
        metavar="RUN_DIR",
        help=f"the training run's output folder (default {default_dir}; a --dry-run's is "
        f"{dry_run_dir})",
    )
    parser.add_argument(
        "--format",
        choices=EXPORT_FORMATS,
        default=EXPORT_FORMATS[0],
        help=f"the export's format (default {EXPORT_FORMATS[0]})",
    )
    parser.add_argument(
        "--output",
        type=pathlib.Path,
        metavar="PATH",
        help="where the export goes (default RUN_DIR/embedding_saved_model or "
        "RUN_DIR/embedding.onnx); its folder must exist",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace what is at --output, if anything"
    )
    return parser


def parse_mnist_command(argv, defaults):
    """The command line of `mnist_siamese.py`: training, or `compare`. Returns `(prog, args)`.

    `defaults` are `mnist_parser`'s; `args.command` is None for training, whose
    `--batch-size` and `--output-dir` not given get the example's values, or the dry run's
    with `--dry-run`, which also trains `dry_run_epochs` epochs on `dry_run_data`.
    """
    command, rest = split_command(argv, ("compare", "export"))
    if command == "export":
        parser = export_parser("mnist_siamese.py", *MNIST_OUTPUT_DIRS)
        return parser.prog, parser.parse_args(rest, argparse.Namespace(command=command))
    if command is None:
        parser = mnist_parser(defaults)
        parser.set_defaults(command=None)
        args = parser.parse_args(rest)
        dry = "dry_run_" if args.dry_run else ""
        if args.dry_run:  # its epoch count, even with --epochs, as it always was
            args.epochs = defaults["dry_run_epochs"]
            args.data = args.data or defaults["dry_run_data"]
        args.batch_size = args.batch_size or defaults[f"{dry}batch_size"]
        args.output_dir = args.output_dir or pathlib.Path(MNIST_OUTPUT_DIRS[bool(dry)])
        return parser.prog, args
    parser = ArgumentParser(
        prog="mnist_siamese.py compare",
        description="Compare two images of digits with a trained run's embedding network: "
        "their distance, and whether it calls them the same digit at the run's best "
        "threshold and at the example's 0.5. Images of any size, colour or grey, are read "
        "as MNIST's digits are: grey, 28 x 28, light on dark (a dark digit on a light ground "
        "is inverted).",
    )
    parser.add_argument("images", nargs="*", type=pathlib.Path, metavar="IMAGE", help="two images")
    parser.add_argument(
        "--pairs",
        type=pathlib.Path,
        metavar="CSV",
        help="compare many pairs instead: a CSV of two image paths a row (relative to the "
        "CSV's folder; a header row is allowed)",
    )
    parser.add_argument(
        "--output",
        type=pathlib.Path,
        metavar="CSV",
        help="with --pairs: where the distances and verdicts go (default "
        "RUN_DIR/compared-pairs.csv)",
    )
    add_run_dir_option(parser, *MNIST_OUTPUT_DIRS)
    args = parser.parse_args(rest)
    if not (len(args.images) == 2 if args.pairs is None else not args.images):
        parser.error("give two images, or --pairs CSV and no image")
    if args.output is not None and args.pairs is None:
        parser.error("--output goes with --pairs")
    args.command = command
    return parser.prog, args


def parse_triplet_command(argv, defaults):
    """The command line of `triplet_totally_looks_like.py`: training, `search` or `compare`.

    Returns `(prog, args)`; `defaults` are `triplet_parser`'s; `args.command` is None for
    training, whose `--epochs`, `--image-size`, `--weights` and `--output-dir` not given get
    the example's values, or the dry run's with `--dry-run`.
    """
    command, rest = split_command(argv, ("search", "compare", "export"))
    if command == "export":
        parser = export_parser("triplet_totally_looks_like.py", *TRIPLET_OUTPUT_DIRS)
        return parser.prog, parser.parse_args(rest, argparse.Namespace(command=command))
    if command is None:
        parser = triplet_parser(defaults)
        parser.set_defaults(command=None)
        args = parser.parse_args(rest)
        dry = "dry_run_" if args.dry_run else ""
        args.epochs = args.epochs or defaults[f"{dry}epochs"]
        args.image_size = args.image_size or defaults[f"{dry}image_size"]
        args.weights = args.weights or ("none" if dry else "imagenet")
        if args.margin is None:
            args.margin = NORMALIZED_MARGIN if args.normalize else defaults["margin"]
        args.output_dir = args.output_dir or pathlib.Path(TRIPLET_OUTPUT_DIRS[bool(dry)])
        return parser.prog, args
    prog = f"triplet_totally_looks_like.py {command}"
    if command == "compare":
        parser = ArgumentParser(
            prog=prog,
            description="The squared distance and the cosine similarity of two images' "
            "embeddings, from a trained run's model; images are read as training read them.",
        )
        parser.add_argument("images", nargs=2, type=pathlib.Path, metavar="IMAGE")
    else:
        parser = ArgumentParser(
            prog=prog,
            description="Find the images of a folder that look most like QUERY, by the "
            "squared distance of their embeddings from a trained run's model. The folder's "
            "embeddings are kept in the run folder and reused while its files and the model "
            "stay the same.",
        )
        parser.add_argument("query", type=pathlib.Path, metavar="QUERY", help="an image")
        parser.add_argument(
            "--gallery",
            type=pathlib.Path,
            metavar="DIR",
            required=True,
            help="the folder of images to search (sub-folders included)",
        )
        parser.add_argument(
            "-k",
            type=positive_int,
            default=5,
            help="how many of the nearest images to show (default 5)",
        )
        parser.add_argument(
            "--output",
            type=pathlib.Path,
            metavar="PNG",
            help="where the picture of the query and its nearest images goes (default "
            "RUN_DIR/search.png)",
        )
        parser.add_argument(
            "--batch-size",
            type=positive_int,
            default=defaults["batch_size"],
            metavar="N",
            help=f"images embedded per batch (default {defaults['batch_size']})",
        )
    add_run_dir_option(parser, *TRIPLET_OUTPUT_DIRS)
    args = parser.parse_args(rest)
    args.command = command
    return prog, args
