"""Front end for `mlxflash eval` from a checkout: python tools/eval.py --task arc_easy --limit 100 --compare.

Everything lives in mlxflash/eval/; this only forwards the arguments.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlxflash.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
