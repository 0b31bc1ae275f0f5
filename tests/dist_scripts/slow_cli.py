"""``anycnn train`` with each data-parallel step slowed down and logged, so a test can signal
the job mid-epoch: ``python slow_cli.py SECONDS LOG_FOLDER ARGS...`` (rank R appends
``epoch step`` lines to ``LOG_FOLDER/rank-R.log``)."""

import sys
import time
from pathlib import Path

from anycnn.cli.commands import main
from anycnn.train import trainer as T

_step = T.Trainer.parallel_step


def slow_step(self, x, y):
    out = _step(self, x, y)
    log = Path(sys.argv[2]) / f"rank-{self.comm.rank}.log"
    with open(log, "a") as f:
        f.write(f"{self.epoch} {self.step + 1}\n")
    time.sleep(float(sys.argv[1]))
    return out


T.Trainer.parallel_step = slow_step
sys.exit(main(sys.argv[3:]))
