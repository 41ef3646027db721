"""`python tests/fsdp_stop.py STEP <retok args>`: the retok CLI, with Ctrl-C delivered to the main process
right after optimizer step STEP (the way a user stops a multi-process run). tests/test_fsdp.py launches it
under `accelerate launch` to test resuming."""

from __future__ import annotations

import os
import signal
import sys

import retok.train.loop as loop
from retok.cli import main

STOP_AT = int(sys.argv.pop(1))


def _stop(step: int) -> None:
    if step == STOP_AT and os.environ.get("RANK", "0") == "0":
        os.kill(os.getpid(), signal.SIGINT)


loop._on_step = _stop
sys.argv[0] = "retok"
main()
