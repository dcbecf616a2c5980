#!/usr/bin/env python3
"""Repack (and optionally quantize) a checkpoint into a flash bundle: the same converter as
`mlxflash convert` (mlxflash.convert), from a checkout.

    python tools/repack.py SOURCE OUT [--bits 4|8 --group-size 32|64|128] [--dtype float16|bfloat16|float32]
"""

from __future__ import annotations

import sys

from mlxflash.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
