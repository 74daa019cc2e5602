"""``benchmarks/filter_frontier.py``'s model loader for the studies (benchmarks/ is this folder's parent)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from filter_frontier import load_model  # noqa: E402

__all__ = ["load_model"]
