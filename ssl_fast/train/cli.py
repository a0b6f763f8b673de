"""``ssl-fast pretrain``: self-supervised pre-training from the command line (also under torchrun).

Bad arguments fail before any work starts, each with one line naming the flag and exit status 2:
numbers out of range and unknown devices when the command line is parsed, then the resolved
configuration, the ``--out`` folder (must be a creatable, writable folder) and the data.
"""
import argparse
import os
import sys
import tempfile
import warnings
from typing import Optional

from ssl_fast._argtypes import device, number
from ssl_fast.data.datasets import BAD_IMAGE_POLICIES, BadImageWarning, load_dataset
from ssl_fast.methods import get_method, list_methods
from ssl_fast.models import is_model, list_models
from ssl_fast.train.config import EVAL_SPLITS, OPTIMIZERS

# flags that belong to TrainConfig; every other dest is a method option
_TRAIN_FLAGS = ("method", "data", "arch", "epochs", "batch_size", "lr", "min_lr", "warmup_epochs",
                "weight_decay", "weight_decay_end", "optimizer", "out", "resume", "init", "overwrite", "device", "seed", "amp",
                "image_size", "knn_k", "knn_temperature", "eval_split", "val_fraction", "linear_probe",
                "max_steps_per_epoch", "stop_after_epochs", "log_every", "attention_images")
# flags the command itself uses (neither TrainConfig fields nor method options)
_CLI_FLAGS = ("command", "list_archs", "bad_images")


class CLIParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line plus a hint, not the whole usage text.

    ``error`` prints ``<prog>: error: <message>`` and ``run '<prog> --help' for the options``
    to stderr and exits with status 2. Sub-parsers made from it are of the same class.
    """

    def error(self, message: str):
        """Print the one-line error and the hint; exit with status 2."""
        self.exit(2, f"{self.prog}: error: {message}\nrun '{self.prog} --help' for the options\n")


def check_out_folder(out: str) -> Optional[str]:
    """Why ``out`` cannot serve as the output folder, or None when it can.

    It must be a folder, or a path whose nearest existing ancestor is a folder, in which a file
    can be created (tried for real, with a temporary file that is removed, so it holds for root
    and read-only file systems too). Nothing is created.
    """
    if os.path.exists(out) and not os.path.isdir(out):
        return f"--out {out!r} is a file, not a folder"
    probe = os.path.abspath(out)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        return f"--out {out!r} cannot be created: {probe!r} is a file, not a folder"
    try:
        fd, tmp = tempfile.mkstemp(dir=probe, prefix=".ssl-fast-write-test-")
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        where = "" if probe == os.path.abspath(out) else f" (its nearest existing folder {probe!r})"
        return f"--out {out!r} is not writable{where}: {e.strerror or e}"
    return None


def add_pretrain_parser(sub) -> argparse.ArgumentParser:
    """Add the ``pretrain`` subcommand to an argparse sub-parser collection."""
    p = sub.add_parser(
        "pretrain", help="self-supervised pre-training (DINO, BYOL, SimSiam, CARE) with k-NN evaluation",
        description="Pre-train a backbone without labels; evaluate it by k-NN on held-out labelled images "
                    "each epoch and a linear probe at the end. Defaults: DINO on the embedded scikit-learn digits, a few minutes on a "
                    "CPU; every method has its own preset for the digits. "
                    "Launch with torchrun --nproc_per_node=N -m ssl_fast pretrain ... for data parallelism.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--method", default="dino", help=f"method: {', '.join(list_methods())}")
    p.add_argument("--data", default="digits",
                   help="'digits' (embedded, no download), 'cifar10:<folder with data_batch_1..5, test_batch>' "
                        "or an image folder with one subfolder per class (or with train/ and val/ folders)")
    p.add_argument("--bad-images", default="skip", choices=BAD_IMAGE_POLICIES,
                   help="an image-folder file that cannot be read (corrupt, truncated, unusable pixel format): "
                        "'skip' it with a warning naming it, or stop with an 'error' naming it")
    p.add_argument("--arch", default=None, help="backbone (default: the data preset's); see --list-archs")
    p.add_argument("--epochs", type=number(int, 1), default=None, help="epochs (default: the data preset's)")
    p.add_argument("--batch-size", type=number(int, 1), default=None, help="GLOBAL batch size over all processes")
    p.add_argument("--lr", type=number(float, 0, lo_open=True), default=None,
                   help="base learning rate per 256 images (scaled by batch/256)")
    p.add_argument("--min-lr", type=number(float, 0), default=None, help="final learning rate")
    p.add_argument("--warmup-epochs", type=number(float, 0), default=None, help="linear learning-rate warm-up, epochs")
    p.add_argument("--weight-decay", type=number(float, 0), default=None, help="initial weight decay")
    p.add_argument("--weight-decay-end", type=number(float, 0), default=None, help="final weight decay (cosine)")
    p.add_argument("--optimizer", default=None, choices=OPTIMIZERS,
                   help="optimizer (default: the method's; LARS leaves biases and norms unadapted and undecayed)")
    p.add_argument("--out", default=None, help="output folder (logs, checkpoint, figures); default runs/<method>-<data>")
    p.add_argument("--resume", default=None, help="checkpoint file or folder to continue from, or 'auto' "
                                                  "(the checkpoint in --out, if any)")
    p.add_argument("--init", default=None,
                   help="start a fresh run from the weights of another run's checkpoint (a stage-1 model, e.g. "
                        "--method cvsa --init runs/byol-.../checkpoint.pth); ignored with --resume")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh even though --out holds an earlier run's checkpoint (it is replaced)")
    p.add_argument("--device", default="auto", type=device, help="auto, cpu, cuda, cuda:N")
    p.add_argument("--seed", type=number(int, 0), default=0)
    p.add_argument("--amp", default="auto", choices=("auto", "bf16", "off"),
                   help="bf16 autocast (auto: on GPUs only)")
    p.add_argument("--image-size", type=number(int, 1), default=None, help="side the images are stored at")
    p.add_argument("--knn-k", type=number(int, 1), default=20, help="neighbours in the k-NN evaluation")
    p.add_argument("--knn-temperature", type=number(float, 0, lo_open=True), default=0.07,
                   help="k-NN vote temperature")
    p.add_argument("--eval-split", default="test", choices=EVAL_SPLITS,
                   help="evaluate on the held-out 'test' split, or on a 'val' share carved from the training images "
                        "(to choose settings without ever looking at the test split)")
    p.add_argument("--val-fraction", type=number(float, 0, 1, lo_open=True, hi_open=True), default=0.2,
                   help="share of each class held out by --eval-split val")
    p.add_argument("--linear-probe", type=int, choices=(0, 1), default=1,
                   help="1: fit a linear probe on frozen features at the end (and at random init and on raw pixels)")
    p.add_argument("--max-steps-per-epoch", type=number(int, 1), default=None, help="cap steps per epoch (quick tries)")
    p.add_argument("--stop-after-epochs", type=number(int, 1), default=None,
                   help="stop after this many epochs in total (schedules still span --epochs); continue with --resume")
    p.add_argument("--log-every", type=number(int, 1), default=10, help="progress line every N steps")
    p.add_argument("--attention-images", type=number(int, 1), default=6,
                   help="held-out images in attention.png")
    p.add_argument("--list-archs", action="store_true", help="print the known architectures and exit")
    for name in list_methods():
        get_method(name).add_arguments(p)
    return p


def _load_data(spec: str, image_size: int, bad_images: str):
    """``load_dataset`` with skipped-image warnings printed as plain ``warning: ...`` lines (rank 0 only)."""
    quiet = os.environ.get("RANK", "0") != "0"
    show = warnings.showwarning

    def _show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, BadImageWarning):
            if not quiet:
                print(f"warning: {message}", file=sys.stderr, flush=True)
        else:
            show(message, category, filename, lineno, file, line)

    with warnings.catch_warnings():
        warnings.simplefilter("always", BadImageWarning)
        warnings.showwarning = _show
        return load_dataset(spec, image_size, bad_images=bad_images)


def run_pretrain(args: argparse.Namespace, parser: Optional[argparse.ArgumentParser] = None) -> int:
    """Run the ``pretrain`` command.

    Args:
        args: the parsed ``pretrain`` arguments.
        parser: the ``pretrain`` parser, whose ``error`` reports bad arguments (and exits).

    Returns:
        The exit status: 0 done, 1 training failed (non-finite loss), 2 bad arguments (when
        ``parser`` is None; otherwise ``parser.error`` exits with 2).
    """
    from ssl_fast.train.trainer import NonFiniteLossError, TrainConfig, Trainer, resolve_config

    def fail(msg: str) -> int:
        if parser is not None:
            parser.error(msg)  # exits with status 2
        print(f"ssl-fast pretrain: error: {msg}", file=sys.stderr)
        return 2

    if args.list_archs:
        print("\n".join(list_models()))
        return 0
    if args.method not in list_methods():
        return fail(f"unknown method {args.method!r}; known methods: {', '.join(list_methods())}")
    if args.arch is not None and not is_model(args.arch):
        return fail(f"unknown architecture {args.arch!r}; known architectures: {', '.join(list_models())}")
    d = vars(args)
    cfg = TrainConfig(**{k: d[k] for k in _TRAIN_FLAGS},
                      options={k: v for k, v in d.items() if k not in _TRAIN_FLAGS and k not in _CLI_FLAGS})
    try:
        cfg = resolve_config(cfg)
    except ValueError as e:
        return fail(str(e))
    problem = check_out_folder(cfg.out)
    if problem:
        return fail(problem)
    try:
        data = _load_data(cfg.data, cfg.image_size, getattr(args, "bad_images", "skip"))
    except (ValueError, FileNotFoundError, ImportError) as e:
        return fail(f"--data: {e}")
    try:
        trainer = Trainer(cfg, data=data)
    except (ValueError, FileNotFoundError) as e:
        return fail(str(e))
    try:
        trainer.fit()
    except NonFiniteLossError as e:
        print(f"ssl-fast pretrain: error: {e}", file=sys.stderr)
        return 1
    finally:
        # on success (or a stop every rank makes together) all ranks release the process group
        # together; an unexpected error on one rank must not wait on the others
        trainer.close(wait=sys.exc_info()[0] is None)
    return 0
