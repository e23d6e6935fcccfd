"""``python -m monkey generate|evaluate ...``: MONKEY on diffusers pipelines from the command line.

Imported lazily so that the package itself, and the WebUI extension, never need diffusers.
"""

from __future__ import annotations

import sys


def main() -> int:
    from .diffusers.cli import main as cli_main

    return cli_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
