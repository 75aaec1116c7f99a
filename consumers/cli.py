"""``vllm-mm-events`` command line."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vllm-mm-events")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the tiny-model demo on the embedded defaults")
    demo.add_argument("--workdir", default=None, help="where the model, objects and event log go")
    demo.add_argument("--requests", type=int, default=4)
    args = parser.parse_args(argv)
    if args.command == "demo":
        from publisher.demo.run import run_demo

        return run_demo(args.workdir, args.requests)
    return 2


if __name__ == "__main__":
    sys.exit(main())
