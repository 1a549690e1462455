"""`python -m clipsql …` and the `clipsql` console script (pyproject: `clipsql.__main__:main`).

Ctrl-C while the command line starts (imports, argument parsing) ends it with one line and
exit code 130, never a traceback: the handler is installed here, before anything else is
imported. A command's own work (cli._run) turns Ctrl-C into KeyboardInterrupt instead, so that
a writer closes what it opened."""
import os
import signal
import sys


def _interrupted(signum, frame):  # noqa: ANN001, ANN202
    sys.stderr.write("Error: interrupted\n")
    sys.stderr.flush()
    os._exit(130)


signal.signal(signal.SIGINT, _interrupted)

from clipsql.cli import main  # noqa: E402  (after the handler: imports take a moment)

if __name__ == "__main__":
    main()
