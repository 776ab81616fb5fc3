"""``import _repo`` puts the repository root on sys.path, so a benchmark run as a script can import the shared
test models (``tests.models``)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
