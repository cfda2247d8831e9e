"""``python -m tests.slow_train ARGS``: ``python -m fastkd.train ARGS`` with a pause of FASTKD_TEST_STEP_DELAY
seconds after every optimizer step, so a crash-recovery test's kill lands mid-epoch. The pause is test
scaffolding: it lives here, outside the library, and wraps the scheduler step every optimizer step calls."""

import os
import sys
import time

import torch

from fastkd import train

_delay = float(os.environ.get("FASTKD_TEST_STEP_DELAY", "0") or 0)
_step = torch.optim.lr_scheduler.LambdaLR.step


def _slow_step(self, *args, **kwargs):
    _step(self, *args, **kwargs)
    time.sleep(_delay)


if _delay:
    torch.optim.lr_scheduler.LambdaLR.step = _slow_step

if __name__ == "__main__":
    sys.exit(train.main())
