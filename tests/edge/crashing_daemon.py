"""`camtrap-edge` with a decoder that takes the whole process down on chosen files, the way a
decompression bomb or a crashing native decoder would (``os._exit``: no cleanup, no exception).

Test-only: the files whose names match the glob in ``$CAMTRAP_TEST_CRASH_ON`` kill the process
when decoded. The product has no such hook; this wrapper patches the daemon's decoder and then
runs the ordinary command line. Usage: ``python tests/edge/crashing_daemon.py run --config C``.
"""

from __future__ import annotations

import fnmatch
import os
import sys

import edge.daemon
from edge.cli import main

_real_read_image = edge.daemon.read_image
_PATTERN = os.environ["CAMTRAP_TEST_CRASH_ON"]


def _crashing_read_image(path, *args, **kwargs):
    if fnmatch.fnmatch(os.path.basename(str(path)), _PATTERN):
        os._exit(70)
    return _real_read_image(path, *args, **kwargs)


edge.daemon.read_image = _crashing_read_image

if __name__ == "__main__":
    sys.exit(main())
