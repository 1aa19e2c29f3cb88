"""``python -m lightning_vlm``: see `lightning_vlm.cli`."""

import sys

from lightning_vlm.cli import main

sys.exit(main())
