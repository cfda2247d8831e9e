"""fastkd's lean distillation trainer: ``python -m fastkd.train --method tinybert --etd impt``.

The command line only; the trainer itself is :class:`fastkd.training.trainer.Trainer`, its options
:class:`fastkd.config.TrainConfig`.
"""

from __future__ import annotations

import sys

from fastkd.config import TrainConfig, build_parser, parse_config
from fastkd.disk import DiskFullError
from fastkd.recipes import MappingError
from fastkd.training.engine import NonFiniteLossError
from fastkd.training.report import report
from fastkd.training.trainer import Trainer, run

__all__ = ["main", "run", "parse_config", "build_parser", "TrainConfig", "Trainer"]


def quiet_libraries() -> None:
    """The CLI's output is fastkd's own lines and training progress bar. The libraries' per-call progress bars
    (datasets' map/cast, transformers' weight loading and saving) and transformers' load report (which lists the
    task head that fastkd adds on purpose as MISSING) would bury them; their errors still show."""
    import datasets
    from transformers.utils import logging as hf_logging

    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def error_text(e: Exception, width: int = 100) -> str:
    """The CLI's error message, broken into lines of at most ``width`` characters (never inside a word or a
    path), continuation lines indented."""
    import textwrap

    return "\n".join(textwrap.fill(line, width, subsequent_indent="  ", break_long_words=False,
                                   break_on_hyphens=False) for line in f"fastkd.train: error: {e}".splitlines())


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_config(argv)
        quiet_libraries()
        result = run(cfg)
    except (ValueError, MappingError, FileNotFoundError, NonFiniteLossError, DiskFullError) as e:
        print(error_text(e), file=sys.stderr)
        return 2
    trainer = result.pop("trainer")
    if trainer.dist.main:
        print(report(result, trainer.subset_note))
    if trainer.dist.enabled:
        import torch.distributed as tdist

        tdist.barrier()
        tdist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
