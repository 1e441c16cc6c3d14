"""`python -m gsae.browser SAE_DIR --out DIR [--compare OTHER] [--tokens N] ...`."""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import fields

from gsae.browser.site import InspectConfig, inspect
from gsae.errors import GsaeError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gsae.browser", description=__doc__)
    parser.add_argument("sae_dir", metavar="SAE_DIR", help="the SAE folder to inspect")
    for f in fields(InspectConfig):
        parser.add_argument(f"--{f.name}", type=type(f.default), default=f.default,
                            help=f"{f.metadata['help']} (default: {f.default})")
    args = parser.parse_args(argv)
    cfg = InspectConfig(**{f.name: getattr(args, f.name) for f in fields(InspectConfig)})
    start = time.perf_counter()
    try:
        out = inspect(args.sae_dir, cfg)
    except GsaeError as err:
        print(f"gsae: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}/index.html ({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
