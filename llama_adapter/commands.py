"""How every command line of the package ends: a message and status 2 for bad input, never a traceback.

``python -m llama_adapter.train``, ``.eval`` and the backbone trainers run their work through
``run_command``; a bug still keeps its traceback.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

import torch
import torch.distributed as dist

from .errors import USER_ERRORS, user_message

USAGE_ERROR = 2
INTERRUPTED = 130


def run_command(work: Callable[[], object], *, out_of_memory: str, interrupted: str) -> int:
    """Run ``work``; returns the exit status.  ``out_of_memory`` says what to lower, ``interrupted`` how to go on.

    Only the first process of a torchrun job prints, and a process group is always torn down.
    """
    main_process = int(os.environ.get("RANK", "0")) == 0
    try:
        work()
    except USER_ERRORS as e:
        if main_process:
            print(f"error: {user_message(e)}", file=sys.stderr)
        return USAGE_ERROR
    except torch.OutOfMemoryError:
        if main_process:
            print(f"error: out of memory; {out_of_memory}", file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt:
        if main_process:
            print(f"\ninterrupted; {interrupted}", file=sys.stderr)
        return INTERRUPTED
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0
