"""``python -m mpnode.bench``: the ``mpnode-bench`` command line."""

from .cli import main

raise SystemExit(main())
