"""``python -m l2pd.cli``: the ``l2pd`` command (torchrun and accelerate launch modules)."""

from . import main

raise SystemExit(main())
