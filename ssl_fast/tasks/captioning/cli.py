"""``ssl-fast caption``: train and evaluate the Show-Attend-Tell captioner from the command line.

Bad arguments fail before any work, each with one line naming the flag and exit status 2:
numbers and devices when the command line is parsed, then the backbone, the ``--out`` folder,
the data and the checkpoints.
"""
import argparse
import sys
from dataclasses import asdict
from typing import Optional

import torch

from ssl_fast._argtypes import device, number
from ssl_fast.tasks.captioning.task import SCENES, CaptionConfig


def _stage_or_none(text: str) -> Optional[int]:
    """``--fine-tune-from``: a stage number >= 0, or ``none`` (a frozen encoder)."""
    if text.lower() == "none":
        return None
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a stage number >= 0 or 'none', got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be a stage number >= 0 or 'none', got {text!r}")
    return v


def _data(text: str) -> str:
    """``--data``: ``scenes`` or ``karpathy:<json>:<image folder>`` (checked for form here, for files later)."""
    if text == SCENES:
        return text
    from ssl_fast.tasks.captioning.karpathy import parse_spec

    try:
        parse_spec(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be 'scenes' or 'karpathy:<json>:<image folder>', got {text!r}") from None
    return text


def add_caption_parser(sub) -> argparse.ArgumentParser:
    """Add the ``caption`` sub-command to an argparse sub-parser collection."""
    d = CaptionConfig()
    p = sub.add_parser(
        "caption", help="train and evaluate a Show-Attend-Tell captioner (embedded digit scenes by default)",
        description="Train an attention LSTM captioner on an ssl_fast backbone's feature map and evaluate it "
                    "(BLEU-1..4; attention localisation on the embedded scenes), writing logs, a checkpoint "
                    "and per-word attention figures. Default: the embedded digit scenes, a few minutes on a CPU.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", type=_data, default=SCENES,
                   help="'scenes' (embedded digit scenes, no download) or 'karpathy:<dataset_*.json>:<image folder>' "
                        "(COCO, Flickr8k, Flickr30k in the Karpathy split)")
    p.add_argument("--backbone", default=None,
                   help="encoder architecture (ssl-fast pretrain --list-archs); default resnet_mini on the scenes, "
                        "resnet18 otherwise, or the --checkpoint's")
    p.add_argument("--checkpoint", default=None,
                   help="an ssl-fast pretrain checkpoint (file or folder) whose backbone (the teacher's) is the encoder")
    p.add_argument("--feature-stage", type=number(int, 1, 4), default=d.feature_stage,
                   help="ResNet stage (layer1..layer4) whose map the decoder attends over "
                        "(default: 3 on the scenes, an 8x8 grid; 4 otherwise)")
    p.add_argument("--fine-tune-from", type=_stage_or_none, default=d.fine_tune_from,
                   help="first encoder stage trained (0 = all; ResNet: 1..4 = layer1..; ViT: k = block k..), "
                        "or 'none' for a frozen encoder")
    p.add_argument("--image-size", type=number(int, 8), default=None, help="image side (default: 48 scenes, 224 otherwise)")
    p.add_argument("--epochs", type=number(int, 1), default=d.epochs)
    p.add_argument("--batch-size", type=number(int, 1), default=d.batch_size, help="images per step")
    p.add_argument("--captions-per-image", type=number(int, 1), default=None,
                   help="captions trained per image and step (default: 2 scenes, 5 otherwise)")
    p.add_argument("--lr", type=number(float, 0, lo_open=True), default=d.lr, help="peak learning rate (AdamW)")
    p.add_argument("--min-lr", type=number(float, 0), default=d.min_lr, help="final learning rate (cosine)")
    p.add_argument("--warmup-epochs", type=number(float, 0), default=d.warmup_epochs)
    p.add_argument("--weight-decay", type=number(float, 0), default=d.weight_decay)
    p.add_argument("--grad-clip", type=number(float, 0), default=d.grad_clip, help="gradient-norm clip, 0 = off")
    p.add_argument("--alpha-c", type=number(float, 0), default=d.alpha_c,
                   help="lambda of the doubly stochastic regulariser lambda * sum_i (1 - sum_t alpha_ti)^2")
    p.add_argument("--word-weight", type=number(float, 0), default=None,
                   help="weight of the word-presence loss on the max-pooled encoder features (default: 1 on the "
                        "scenes with a trained encoder, else 0)")
    p.add_argument("--no-pos-embed", dest="pos_embed", action="store_false",
                   help="no learned position embedding on CNN features")
    p.add_argument("--embed-dim", type=number(int, 1), default=d.embed_dim)
    p.add_argument("--decoder-dim", type=number(int, 1), default=d.decoder_dim)
    p.add_argument("--attention-dim", type=number(int, 1), default=d.attention_dim)
    p.add_argument("--dropout", type=number(float, 0, 1, hi_open=True), default=d.dropout)
    p.add_argument("--max-len", type=number(int, 1), default=d.max_len, help="most words per caption")
    p.add_argument("--min-word-count", type=number(int, 1), default=d.min_word_count,
                   help="rarer training words become <unk>")
    p.add_argument("--beam-width", type=number(int, 1), default=d.beam_width, help="beam width of the test captions")
    p.add_argument("--scenes", type=number(int, 1), nargs=3, metavar=("TRAIN", "VAL", "TEST"),
                   default=[d.n_train, d.n_val, d.n_test], help="embedded scenes per split")
    p.add_argument("--data-seed", type=number(int, 0), default=d.data_seed, help="seed of the embedded scenes")
    p.add_argument("--examples", type=number(int, 0), default=d.examples, help="test examples drawn as PNGs")
    p.add_argument("--out", default=d.out, help="output folder (logs, checkpoint, figures)")
    p.add_argument("--resume", default=None,
                   help="checkpoint file or folder to continue from, or 'auto' (the checkpoint in --out, if any)")
    p.add_argument("--overwrite", action="store_true", help="start afresh even though --out holds a checkpoint")
    p.add_argument("--seed", type=number(int, 0), default=d.seed)
    p.add_argument("--device", type=device, default=d.device, help="auto, cpu, cuda, cuda:N")
    p.add_argument("--stop-after-epochs", type=number(int, 1), default=None,
                   help="stop after this many epochs in total (the schedule still spans --epochs); continue with --resume")
    p.add_argument("--log-every", type=number(int, 1), default=d.log_every, help="progress line every N steps")
    p.add_argument("--threads", type=number(int, 1), default=None, help="CPU threads (torch.set_num_threads)")
    return p


def config_from_args(args: argparse.Namespace) -> CaptionConfig:
    """The :class:`CaptionConfig` of parsed ``caption`` arguments."""
    fields = set(asdict(CaptionConfig()))
    kw = {k: v for k, v in vars(args).items() if k in fields}
    kw["n_train"], kw["n_val"], kw["n_test"] = args.scenes
    return CaptionConfig(**kw)


def run_caption(args: argparse.Namespace, parser: Optional[argparse.ArgumentParser] = None) -> int:
    """Run the ``caption`` command.

    Returns:
        0 done, 1 training failed (non-finite loss), 2 bad arguments (when ``parser`` is None;
        otherwise ``parser.error`` exits with 2).
    """
    from ssl_fast.models import is_model, list_models
    from ssl_fast.tasks.captioning.task import CaptionTask
    from ssl_fast.train.checkpoint import CheckpointError
    from ssl_fast.train.cli import check_out_folder

    def fail(msg: str) -> int:
        if parser is not None:
            parser.error(msg)  # exits with status 2
        print(f"ssl-fast caption: error: {msg}", file=sys.stderr)
        return 2

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.backbone is not None and not is_model(args.backbone):
        return fail(f"--backbone: unknown architecture {args.backbone!r}; known: {', '.join(list_models())}")
    cfg = config_from_args(args)
    problem = check_out_folder(cfg.out)
    if problem:
        return fail(problem)
    try:
        task = CaptionTask(cfg)
    except CheckpointError as e:
        return fail(str(e) if "--" in str(e) else f"--checkpoint/--resume: {e}")
    except FileNotFoundError as e:
        return fail(str(e) if str(e).startswith("--") else f"--data: {e}")
    except (ValueError, TypeError) as e:
        msg = str(e)
        if not msg.startswith("--"):
            msg = {"fine_tune_from": "--fine-tune-from", "stage": "--feature-stage"}.get(msg.split(" ")[0], "") \
                  + (": " if msg.split(" ")[0] in ("fine_tune_from", "stage") else "") + msg
        return fail(msg)
    try:
        task.fit()
    except FloatingPointError as e:
        print(f"ssl-fast caption: {e}", file=sys.stderr)
        return 1
    return 0
