"""``python -m fastdpo ...``: the ``fastdpo`` command (:mod:`fastdpo.cli`), for launchers that
take a module, as ``torchrun -m fastdpo train ...`` does."""

import sys

from fastdpo.cli import main

sys.exit(main())
