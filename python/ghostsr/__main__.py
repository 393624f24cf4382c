"""``python -m ghostsr ARGS``: runs the ``ghostsr`` executable of this package with ARGS."""

import os
import subprocess
import sys

from . import get_executable_path


def main() -> int:
    exe = get_executable_path()
    argv = [exe, *sys.argv[1:]]
    if os.name == "posix":
        os.execv(exe, argv)  # replaces this process: exit code and signals are the CLI's own
    return subprocess.call(argv)


if __name__ == "__main__":
    sys.exit(main())
