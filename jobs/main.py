"""The main job on the embedded default. (Being extended to the full federated run: see README.)"""

from __future__ import annotations

import runpy
from pathlib import Path

if __name__ == "__main__":
    runpy.run_path(str(Path(__file__).with_name("local_demo.py")), run_name="__main__")
