"""``ssl-fast pretrain``: self-supervised pre-training from the command line (also under torchrun)."""
import argparse
import sys
from typing import Optional

from ssl_fast.methods import get_method, list_methods
from ssl_fast.models import is_model, list_models

# flags that belong to TrainConfig; every other dest is a method option
_TRAIN_FLAGS = ("method", "data", "arch", "epochs", "batch_size", "lr", "min_lr", "warmup_epochs",
                "weight_decay", "weight_decay_end", "out", "resume", "overwrite", "device", "seed", "amp", "image_size",
                "knn_k", "knn_temperature", "max_steps_per_epoch", "stop_after_epochs", "log_every",
                "attention_images")


def add_pretrain_parser(sub) -> argparse.ArgumentParser:
    """Add the ``pretrain`` subcommand to an argparse sub-parser collection."""
    p = sub.add_parser(
        "pretrain", help="self-supervised pre-training (DINO) with k-NN evaluation",
        description="Pre-train a backbone without labels; evaluate it by k-NN on held-out labelled images "
                    "each epoch. Defaults: DINO on the embedded scikit-learn digits, a few minutes on a CPU. "
                    "Launch with torchrun --nproc_per_node=N -m ssl_fast pretrain ... for data parallelism.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--method", default="dino", help=f"method: {', '.join(list_methods())}")
    p.add_argument("--data", default="digits",
                   help="'digits' (embedded, no download), 'cifar10:<folder with data_batch_1..5, test_batch>' "
                        "or an image folder with one subfolder per class")
    p.add_argument("--arch", default=None, help="backbone (default: the data preset's); see --list-archs")
    p.add_argument("--epochs", type=int, default=None, help="epochs (default: the data preset's)")
    p.add_argument("--batch-size", type=int, default=None, help="GLOBAL batch size over all processes")
    p.add_argument("--lr", type=float, default=None, help="base learning rate per 256 images (scaled by batch/256)")
    p.add_argument("--min-lr", type=float, default=None, help="final learning rate")
    p.add_argument("--warmup-epochs", type=float, default=None, help="linear learning-rate warm-up, epochs")
    p.add_argument("--weight-decay", type=float, default=None, help="initial weight decay")
    p.add_argument("--weight-decay-end", type=float, default=None, help="final weight decay (cosine)")
    p.add_argument("--out", default="runs/dino-digits", help="output folder (logs, checkpoint, figures)")
    p.add_argument("--resume", default=None, help="checkpoint file or folder to continue from, or 'auto' "
                                                  "(the checkpoint in --out, if any)")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh even though --out holds an earlier run's checkpoint (it is replaced)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--amp", default="auto", choices=("auto", "bf16", "off"),
                   help="bf16 autocast (auto: on GPUs only)")
    p.add_argument("--image-size", type=int, default=None, help="side the images are stored at")
    p.add_argument("--knn-k", type=int, default=20)
    p.add_argument("--knn-temperature", type=float, default=0.07)
    p.add_argument("--max-steps-per-epoch", type=int, default=None, help="cap steps per epoch (quick tries)")
    p.add_argument("--stop-after-epochs", type=int, default=None,
                   help="stop after this many epochs in total (schedules still span --epochs); continue with --resume")
    p.add_argument("--log-every", type=int, default=10, help="progress line every N steps")
    p.add_argument("--attention-images", type=int, default=6)
    p.add_argument("--list-archs", action="store_true", help="print the known architectures and exit")
    for name in list_methods():
        cls = get_method(name)
        if hasattr(cls, "add_arguments"):
            cls.add_arguments(p)
    return p


def run_pretrain(args: argparse.Namespace, parser: Optional[argparse.ArgumentParser] = None) -> int:
    """Run the ``pretrain`` command; returns the exit status (0 ok, 1 training failed, 2 bad arguments)."""
    from ssl_fast.train.trainer import NonFiniteLossError, TrainConfig, Trainer

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
                      options={k: v for k, v in d.items() if k not in _TRAIN_FLAGS and k not in ("command", "list_archs")})
    try:
        trainer = Trainer(cfg)
    except (ValueError, FileNotFoundError) as e:
        return fail(str(e))
    try:
        trainer.fit()
    except NonFiniteLossError as e:
        print(f"ssl-fast pretrain: error: {e}", file=sys.stderr)
        return 1
    finally:
        from ssl_fast.train import distributed

        distributed.cleanup()
    return 0
