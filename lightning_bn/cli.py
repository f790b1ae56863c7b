"""`lightning-bn` command line: ``lightning-bn --version``; the ``report`` command reads TensorBoard logs."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import lightning_bn


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lightning-bn`` console script."""
    parser = argparse.ArgumentParser(prog="lightning-bn", description=__doc__)
    parser.add_argument("--version", action="version", version=f"lightning-bn {lightning_bn.__version__}")
    parser.parse_args(argv)
    parser.print_help()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
