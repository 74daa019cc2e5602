"""``python -m l2pd``: the ``l2pd`` command."""

from .cli import main

raise SystemExit(main())
