"""What the console and main.log show: the run folder, a loss from the first step, throughput and ETA in
non-terminal step lines."""

from __future__ import annotations

import re

from _trainer_helpers import TINY, run_main


def test_log_shows_run_folder_first_loss_and_eta(tmp_path):
    run = tmp_path / "run"
    proc = run_main([*TINY, "trainer.log_every_steps=4", f"hydra.run.dir={run}"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    log = (run / "main.log").read_text()
    assert f"run folder: {run}" in log and f"results in {run}" in log
    steps = re.findall(r"step (\d+)/6: loss [0-9.]+, accuracy [0-9.]+, [0-9.]+ samples/s, ETA \d+:\d\d:\d\d", log)
    assert steps == ["1", "4", "6"]  # step 1 shown although only 4 and 6 are logged to metrics.jsonl
    lines = [line for line in (run / "metrics.jsonl").read_text().splitlines() if '"train"' in line]
    assert len(lines) == 2
