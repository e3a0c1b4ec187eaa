"""How a script under torchrun ends when it fails: on its reason.

torchrun prints its own report last, a `ChildFailedError` block that quotes each failed rank's error
file (`TORCHELASTIC_ERROR_FILE`, written by torch's `@record`). So:

- A refused request (a bad override, prompt or checkpoint path: `REQUEST_ERRORS`, raised on every rank
  before the first collective) goes into that file as one line, with no traceback, and the process
  exits 1. torchrun's block then ends on the reason. Outside torchrun the line goes to stderr.
- Anything else keeps its traceback, on stderr and in the error file (what `@record` does).

    if __name__ == "__main__":
        run_hydra_main(main)          # main is a @hydra.main function whose body runs in `reasons_last()`

`HYDRA_FULL_ERROR=1` (Hydra's own switch) shows refused requests with their traceback too.
"""

from __future__ import annotations

import json
import os
import sys
import time
from contextlib import contextmanager
from typing import Callable, Iterator

from hydra.errors import CompactHydraException, MissingConfigException
from omegaconf.errors import OmegaConfBaseException
from torch.distributed.elastic.multiprocessing.errors import get_error_handler

REQUEST_ERRORS = (ValueError, FileNotFoundError, OmegaConfBaseException, CompactHydraException)
"""What a refused request raises: our checks (ValueError naming the value), missing paths, OmegaConf's
type and key checks, Hydra's override and config-group errors."""

_traceback_wanted = os.environ.get("HYDRA_FULL_ERROR") == "1"  # before run_hydra_main sets it


def reason(e: BaseException) -> str:
    """One line: the exception's type and message, without Hydra's search-path listing."""
    if isinstance(e, MissingConfigException) and e.missing_cfg_file and e.options:
        group = e.missing_cfg_file.rpartition("/")[0]
        msg = f"no config {e.missing_cfg_file!r}; the options in {group!r} are {', '.join(e.options)}"
    elif isinstance(e, OmegaConfBaseException) and e.full_key:
        msg = f"{e.full_key}: {str(e).splitlines()[0]}"  # the rest repeats full_key and the class
    else:
        msg = str(e).split("\nConfig search path:")[0]
    return f"{type(e).__name__}: " + " ".join(line.strip() for line in msg.splitlines() if line.strip())


def report_reason(e: BaseException) -> None:
    """The reason where the user will read it last: torchrun's error file, else stderr."""
    line = reason(e)
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:
        # torchrun's format (see ErrorHandler.record_exception) minus "py_callstack": it then quotes
        # the message alone.
        data = {"message": {"message": line, "extraInfo": {"timestamp": str(int(time.time()))}}}
        with open(error_file, "w") as f:
            json.dump(data, f)
    else:
        print(line, file=sys.stderr, flush=True)


@contextmanager
def reasons_last() -> Iterator[None]:
    """Refused request: report its reason and exit 1. Anything else: record it for torchrun (with its
    traceback) and re-raise. Use inside a Hydra task function too, or Hydra adds a line of its own."""
    try:
        yield
    except REQUEST_ERRORS as e:
        if _traceback_wanted:
            raise
        report_reason(e)
        raise SystemExit(1) from None
    except Exception as e:
        get_error_handler().record_exception(e)
        raise


def run_hydra_main(main: Callable[[], object]) -> None:
    """Call a `@hydra.main` function with its errors reported as above. Hydra's own errors (a bad
    override, an unknown config option) are raised, not printed, so that they get the same treatment."""
    os.environ["HYDRA_FULL_ERROR"] = "1"
    with reasons_last():
        main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from cp_attn.comm import exit_process

        exit_process(0)  # the job is done and its output written: skip the interpreter's teardown
