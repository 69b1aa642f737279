"""Test configuration shared by every suite; helpers live in ``tests/support.py``."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
