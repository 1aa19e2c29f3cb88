"""``python -m lightning_vlm``: see `lightning_vlm.cli`; first re-run under jemalloc when installed (`allocator`)."""

import sys

from lightning_vlm.allocator import reexec_with_fast_malloc

reexec_with_fast_malloc()

from lightning_vlm.cli import main  # noqa: E402 - after the re-exec, so torch loads once, under the new malloc

sys.exit(main())
