"""``python -m sdepth_ext.train``: see :mod:`sdepth_ext.train.cli` (``--help`` lists every option)."""

from .cli import main

main()
