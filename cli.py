#!/usr/bin/env python3
"""Entry point: ``python cli.py validate|build|schema|list ...`` (the same as the ``blockgraph`` command)."""

import sys

from blockgraph.cli import main

if __name__ == "__main__":
    sys.exit(main())
