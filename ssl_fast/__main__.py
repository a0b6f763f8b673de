"""Command line: ``ssl-fast <command>`` or ``python -m ssl_fast <command>``."""
import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    """The ``ssl-fast`` parser; its errors (and the sub-commands') are one line plus a hint, exit 2."""
    from ssl_fast.train.cli import CLIParser, add_pretrain_parser

    parser = CLIParser(prog="ssl-fast", description="ssl_fast command line")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="print the available backends and kernels, and why others are not")
    add_pretrain_parser(sub)
    from ssl_fast.train.compare import add_compare_parser

    add_compare_parser(sub)
    from ssl_fast.tasks.captioning.cli import add_caption_parser

    add_caption_parser(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "info":
        from ssl_fast.info import main as info_main

        return info_main()
    if args.command == "compare":
        from ssl_fast.train.compare import run_compare

        return run_compare(args, parser._subparsers._group_actions[0].choices["compare"])
    if args.command == "pretrain":
        from ssl_fast.train.cli import run_pretrain

        return run_pretrain(args, parser._subparsers._group_actions[0].choices["pretrain"])
    if args.command == "caption":
        from ssl_fast.tasks.captioning.cli import run_caption

        return run_caption(args, parser._subparsers._group_actions[0].choices["caption"])
    return 2


if __name__ == "__main__":
    sys.exit(main())
