"""Shared scaffolding of the trainer tests: a tiny teacher and task per module, the CLI arguments of a tiny run,
and running it in-process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fastkd import train
from tests.helpers import make_teacher, write_task


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from threads; on a shared 2-core box they only oversubscribe."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("tiny")
    return {"teacher": make_teacher(root / "teacher"), "data": write_task(root / "data"), "root": root}


def args_for(tiny, out: Path, method: str, *extra: str) -> list[str]:
    return ["--method", method, "--teacher", str(tiny["teacher"]), "--task", str(tiny["data"] / "train.tsv"),
            "--dev", str(tiny["data"] / "dev.tsv"), "--test", str(tiny["data"] / "test.tsv"), "--output-dir",
            str(out), "--student-layers", "2", "--student-hidden", "32", "--student-heads", "4", "--student-ffn",
            "64", "--batch-size", "8", "--epochs", "1", "--log-every", "1", "--latency-runs", "2", "--no-progress",
            "--cache", "off", "--max-length", "24", "--etd", "none", "--keep-run-checkpoints", *extra]
    # random init unless a test asks; the checkpoints kept, which the resume and fault tests read after a run


def run_cli(argv: list[str]) -> dict:
    cfg = train.parse_config(argv)
    res = train.run(cfg, log=lambda *_: None)
    return res


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]


def without(argv: list[str], *flags: str) -> list[str]:
    out = list(argv)
    for flag in flags:
        i = out.index(flag)
        del out[i:i + 2]
    return out



def expect_error(tiny, tmp_path, match, *argv_changes, extra=()):
    argv = args_for(tiny, tmp_path / "err", "tinybert", *extra)
    for k, v in argv_changes:
        argv[argv.index(k) + 1] = v
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        run_cli(argv)
    assert not (tmp_path / "err" / "metrics.jsonl").exists()  # nothing trained


