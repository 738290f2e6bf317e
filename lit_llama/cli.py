"""Running a script's `main` as a command line tool.

`run(main)` exposes `main`'s typed arguments as flags through jsonargparse (its docstring gives the
`--help` text) and turns the errors a user can fix (a wrong path, a bad value, a checkpoint that
does not fit) into one line on stderr and exit status 2, without a traceback. Set
LIT_LLAMA_DEBUG=1 to get the traceback anyway.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from typing import Any, Callable

from jsonargparse import CLI

# Errors that describe a user's input. Anything else is a bug and keeps its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, FileExistsError, PermissionError,
)
# What to do about a path of the wrong kind (the OS's message names the path, not the remedy).
PATH_HINTS: dict[type[BaseException], str] = {
    FileExistsError: "that path exists already: pass a new one (nothing is overwritten)",
    IsADirectoryError: "that path is a folder: pass a file path",
    NotADirectoryError: "part of that path is a file, not a folder: pass a folder path",
}
# Operating-system errors that are about the user's disk, not our code.
DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES}


def run(main: Callable[..., Any], args: list[str] | None = None, positional: bool = False) -> Any:
    """`main`'s signature as the command line (jsonargparse); with `positional`, its arguments without
    a default are positional (`script.py FILE`), as --help then shows."""
    try:
        # exit_on_error=False: a flag jsonargparse cannot parse (a typo, "nan" for a float) raises here and
        # is said in one line, instead of the whole usage text followed by a multi-line error.
        return CLI(main, args=args, as_positional=positional, exit_on_error=False)
    except argparse.ArgumentError as e:
        fail(ValueError(f"{' '.join(str(e).split())}; run with --help to see every flag and its allowed values"))
    except USER_ERRORS as e:
        fail(e, hint=PATH_HINTS.get(type(e), ""))
    except OSError as e:
        if e.errno not in DISK_ERRNOS:
            raise
        fail(e, hint="free some space or choose a writable folder" if e.errno != errno.EACCES else "check the folder's permissions")
    except KeyboardInterrupt:
        print(
            "interrupted; files being written were discarded, finished files are complete; "
            "rerun with --resume auto to continue a training run",
            file=sys.stderr,
        )
        sys.exit(130)


def fail(e: BaseException, hint: str = "") -> None:
    if os.environ.get("LIT_LLAMA_DEBUG"):
        raise e
    message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    print(f"error: {message}{'; ' + hint if hint else ''}", file=sys.stderr)
    sys.exit(2)
