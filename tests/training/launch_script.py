"""Run by test_distributed.py under ``accelerate launch`` with 2 CPU processes (not a test itself).

Trains every stage a few steps, then checks that a stopped + resumed run matches an
uninterrupted one across processes; the main process writes ``result.json`` into argv[1].
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from accelerate import PartialState

from rcg_augment.training import train_all, train_stage
from tests.training.helpers import FAST, digits_source, micro_pipeline


def main(out: Path) -> None:
    results = train_all(digits_source(), out / "all", init=micro_pipeline(), steps=2, **FAST,
                        per_stage={"tokenizer": {"restart_every": 1}})
    kw = dict(FAST, steps=4, restart_every=1)
    full = train_stage("tokenizer", digits_source(), out / "full", init=micro_pipeline(), **kw)
    first = train_stage("tokenizer", digits_source(), out / "split", init=micro_pipeline(), max_steps=2, **kw)
    second = train_stage("tokenizer", digits_source(), out / "split", init=micro_pipeline(), **kw)
    state = PartialState()  # initialised by the trainers' Accelerator
    if state.is_main_process:
        (out / "result.json").write_text(json.dumps({
            "num_processes": state.num_processes,
            "distributed_type": str(state.distributed_type),
            "losses": {k: [h["loss"] for h in r.history] for k, r in results.items()},
            "full": [h["loss"] for h in full.history],
            "split": [h["loss"] for h in first.history + second.history],
            "resumed_from": second.resumed_from,
        }))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
