"""python -m step1x_core.testing make-tiny DIR"""

from __future__ import annotations

import argparse
import sys

from .factory import make_tiny


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m step1x_core.testing")
    sub = parser.add_subparsers(dest="command", required=True)
    tiny = sub.add_parser("make-tiny", help="write tiny random models laid out like ComfyUI's models/ folder")
    tiny.add_argument("directory", help="the models folder to write (created if needed)")
    tiny.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = make_tiny(args.directory, seed=args.seed)
    for path in sorted(p for p in out.rglob("*") if p.is_file() and not p.name.startswith(".")):
        print(path.relative_to(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
