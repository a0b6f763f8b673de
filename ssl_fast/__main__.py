"""Command line: ``ssl-fast <command>`` or ``python -m ssl_fast <command>``."""
import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ssl-fast", description="ssl_fast command line")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="print the available backends and kernels, and why others are not")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "info":
        from ssl_fast.info import main as info_main

        return info_main()
    return 2


if __name__ == "__main__":
    sys.exit(main())
