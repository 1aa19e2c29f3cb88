"""``python -m lightning_vlm``: see `lightning_vlm.cli` (``compare``: `lightning_vlm.compare`); first re-run under
jemalloc when installed (`allocator`)."""

import sys

from lightning_vlm.allocator import reexec_with_fast_malloc

reexec_with_fast_malloc()

if sys.argv[1:2] == ["compare"]:  # above the CLI: it runs the CLI's fits
    from lightning_vlm.compare import compare_main

    sys.exit(compare_main(sys.argv[2:]))

from lightning_vlm.cli import main  # noqa: E402 - after the re-exec, so torch loads once, under the new malloc

sys.exit(main())
