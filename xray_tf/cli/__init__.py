"""The command-line programs, all built one way, and what they share.

Each command is a module here with module-level absl flags, a ``run_command(argv)`` that turns the
flags into library arguments (or a ``TrainConfig``) and calls library code, and a ``main()`` that
``pip`` installs as a console script. Library errors name their own argument (``ConfigError``);
``reports_errors`` maps them onto the flag of the same name, so the user reads
``xray-train: error: --batch_size=0: must be positive.`` and never a traceback.

Nothing heavy is imported here: ``--help`` answers without TensorFlow, which a command imports
only once its flags have parsed (``tensorflow_quietly``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterator

from absl import app, flags

from xray_tf.config import ConfigError, TrainConfig, expand_flagfiles

# Command name -> (module, what it does); ``python -m xray_tf`` lists them without importing any.
COMMANDS = {
    "train": ("xray_tf.cli.train", "train a classifier and write a run directory"),
    "pretrain": ("xray_tf.cli.pretrain", "pretrain a backbone on unlabeled X-rays (self-supervised)"),
    "evaluate": ("xray_tf.cli.evaluate", "measure a run's kept model on its val or test split"),
    "predict": ("xray_tf.cli.predict", "classify image files, optionally with Grad-CAM overlays"),
    "export": ("xray_tf.cli.export", "export a run's model as ONNX, LiteRT or a SavedModel"),
    "compare": ("xray_tf.cli.compare", "compare two runs on the same images, with paired intervals"),
    "report": ("xray_tf.cli.report", "write a run's self-contained report.html"),
    "convert-chexnet": ("xray_tf.cli.convert_chexnet", "convert CheXNet's PyTorch checkpoint to Keras weights"),
    "synthetic": ("xray_tf.cli.synthetic", "write a synthetic dataset (CoronaHack, Kermany, folders or CSV layout)"),
}

# What TensorFlow's shared libraries print while they load, before any Python code can configure
# logging: absl's banner, start-up notes and, on machines without a GPU, the failed CUDA probe.
_STARTUP_NOISE = re.compile(
    r"WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    r"|[IW]\d{4} .*"
    r"|\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+: ([IW] \S+|E \S*cuda\S*) .*"  # older TensorFlow's format
    r"|E\d{4} .*(cuInit|CUDA|cuda|GPU).*"
    r"|To enable the following instructions: .*"
)


def start(run_command: Callable[[list[str]], None]) -> None:
    """Parse the flags (flagfiles expanded as ``expand_flagfiles`` says) and run the command."""
    # --help shows the main module's docstring and flags: make them the command's, whose flags
    # are defined in its module and here (define_config_flags).
    # absl files the main module's flags under sys.argv[0].
    sys.modules["__main__"].__doc__ = sys.modules[run_command.__module__].__doc__
    by_module = flags.FLAGS.flags_by_module_dict()
    for module in (__name__, run_command.__module__):
        for flag in by_module.get(module, []):
            flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)
    app.run(run_command, flags_parser=_parse_flags)


_HELP_FLAGS = frozenset({"-?", "--help", "--helpshort", "--helpfull", "--helpxml"})


def _parse_flags(argv: list[str]) -> list[str]:
    try:
        expanded = [argv[0], *expand_flagfiles(argv[1:])]
    except ConfigError as error:
        sys.exit(f"{os.path.basename(argv[0])}: error: {error.as_flag()}")
    try:
        return app.parse_flags_with_usage(expanded)
    except SystemExit:
        if _HELP_FLAGS.intersection(expanded[1:]):
            sys.exit(0)  # absl exits 1 after printing the help that was asked for
        raise


def reports_errors(program: str) -> Callable[[Callable[[list[str]], None]], Callable[[list[str]], None]]:
    """Decorate a ``run_command``: a library error ends the program with one line naming the flag."""

    def decorate(run_command: Callable[[list[str]], None]) -> Callable[[list[str]], None]:
        @functools.wraps(run_command)
        def wrapped(argv: list[str]) -> None:
            try:
                run_command(argv)
            except ConfigError as error:
                sys.exit(f"{program}: error: {error.as_flag()}")
            # ValueError includes DataError and RunError; FloatingPointError: the loss diverged.
            except (ValueError, OSError, FloatingPointError) as error:
                sys.exit(f"{program}: error: {error}")

        return wrapped

    return decorate


def no_arguments(argv: list[str]) -> None:
    """Refuse positional arguments for a command that takes flags only."""
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")


@contextlib.contextmanager
def tensorflow_quietly() -> Iterator[None]:
    """Import TensorFlow and Keras with their start-up noise kept out of the program's output.

    The noise is written by C++ code while the libraries load, so no logging setting reaches it:
    standard error is caught at the file-descriptor level during the import, and every caught
    line that is not noise (a real import error, say) is written out again afterwards.
    """
    if "tensorflow" not in sys.modules:
        sys.stderr.flush()
        saved = os.dup(2)
        with tempfile.TemporaryFile() as caught:
            os.dup2(caught.fileno(), 2)
            try:
                import keras  # noqa: F401
                import tensorflow  # noqa: F401
            finally:
                os.dup2(saved, 2)
                os.close(saved)
                caught.seek(0)
                kept = [line for line in caught.read().decode(errors="replace").splitlines(keepends=True)
                        if not _STARTUP_NOISE.fullmatch(line.rstrip("\n"))]
                sys.stderr.write("".join(kept))
    yield


def define_config_flags(config_class: type) -> None:
    """One absl flag per field of a config dataclass: its name, default, help and choices."""
    for field in dataclasses.fields(config_class):
        help_text, choices, default = field.metadata["help"], field.metadata["choices"], field.default
        if choices is not None:
            flags.DEFINE_enum(field.name, default, list(choices), help_text)
        elif isinstance(default, tuple):  # a setting given once per value
            flags.DEFINE_multi_string(field.name, list(default) or None, help_text)
        elif isinstance(default, bool):
            flags.DEFINE_bool(field.name, default, help_text)
        elif isinstance(default, int):
            flags.DEFINE_integer(field.name, default, help_text)
        elif isinstance(default, float):
            flags.DEFINE_float(field.name, default, help_text)
        else:
            flags.DEFINE_string(field.name, default, help_text)


def config_from_flags(config_class: type) -> object:
    """The config whose every field is the parsed flag of the same name."""
    return config_class(**{field.name: flags.FLAGS[field.name].value for field in dataclasses.fields(config_class)})


# Every command that runs a model takes --compilation_cache, with training's help.
COMPILATION_CACHE_HELP = TrainConfig.__dataclass_fields__["compilation_cache"].metadata["help"]
