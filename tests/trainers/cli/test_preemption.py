"""SIGTERM (preemption) finishes the optimizer step, saves a checkpoint, writes status interrupted and names the
folder and the command that continues the run; that command ends exactly like the uninterrupted run. SIGINT's
message names the folder too."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _trainer_helpers import MAIN, REPO, TINY, cli_env, read_json, run_main, stderr_lines, without_timings

from trainers.loop.checkpoint import list_checkpoints

ARGS = TINY + ["adapter=sora", "sparse_lambda=3", "adapter.gate_lr=0.05", "adapter.lora_dropout=0.1",
               "trainer.epochs=2", "trainer.batch_size=4", "trainer.grad_accum_steps=2",
               "trainer.save_every_steps=4", "trainer.eval_every_steps=5", "trainer.log_every_steps=3"]
TESTS_ON_PATH = {"PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}"}


def one_line(proc: subprocess.CompletedProcess, code: int) -> str:
    assert proc.returncode == code, proc.stderr
    lines = stderr_lines(proc)
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def test_sigterm_checkpoints_the_step_and_the_printed_command_resumes_exactly(tmp_path):
    full = tmp_path / "full"
    assert run_main(ARGS + [f"hydra.run.dir={full}"]).returncode == 0
    run_dir = tmp_path / "preempted"
    proc = run_main(ARGS + ["+trainer.callbacks.term._target_=_fault_helpers.SignalAt",
                            "+trainer.callbacks.term.step=6", f"hydra.run.dir={run_dir}"], **TESTS_ON_PATH)
    line = one_line(proc, 143)
    # sent after step 6's hooks, seen at the next step's check: step 7 ends, is saved, and the run stops
    checkpoint = run_dir / "checkpoints" / "step-00000007"
    assert line.startswith(f"error: stopped by SIGTERM after step 7, checkpoint {checkpoint} saved; "
                           f"the run folder is {run_dir}; continue with: python main.py ")
    assert read_json(run_dir / "metrics.json") == {"status": "interrupted", "signal": "SIGTERM", "step": 7,
                                                   "checkpoint": str(checkpoint)}
    assert list_checkpoints(run_dir)[-1] == checkpoint  # not a save_every_steps step: no step lost

    command = shlex.split(line.split("continue with: ", 1)[1])
    assert command[:2] == ["python", "main.py"] and command[-2:] == ["resume=auto", f"hydra.run.dir={run_dir}"]
    resumed = subprocess.run([sys.executable, str(MAIN), *command[2:]], cwd=REPO, env=cli_env(**TESTS_ON_PATH),
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert without_timings(read_json(run_dir / "metrics.json")) == without_timings(read_json(full / "metrics.json"))
    assert (run_dir / "metrics.jsonl").read_text() == (full / "metrics.jsonl").read_text()
    assert (run_dir / "adapter" / "adapter_model.safetensors").read_bytes() == \
        (full / "adapter" / "adapter_model.safetensors").read_bytes()


def start_paused(run_dir: Path, flag: Path) -> subprocess.Popen:
    """A run that waits in on_train_begin (inside the training loop) until it is signalled (SIGTERM ends the
    wait and the run stops after its first step; SIGINT raises KeyboardInterrupt in the wait)."""
    proc = subprocess.Popen(
        [sys.executable, str(MAIN), *TINY, f"hydra.run.dir={run_dir}",
         "+trainer.callbacks.pause._target_=_fault_helpers.PauseAtStart", f"+trainer.callbacks.pause.flag={flag}",
         "+trainer.callbacks.pause.seconds=200"],
        cwd=REPO, env=cli_env(**TESTS_ON_PATH), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # a shell's background job ignores SIGINT, and Python keeps an inherited "ignore": give the run the default
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while not flag.exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1]
        time.sleep(0.05)
    return proc


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_from_outside(sig, code, tmp_path):
    run_dir = tmp_path / "run"
    proc = start_paused(run_dir, tmp_path / "started")
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=300)
    line = one_line(subprocess.CompletedProcess(proc.args, proc.returncode, out, err), code)
    assert f"the run folder is {run_dir}; continue with: python main.py " in line
    assert line.endswith(f"resume=auto hydra.run.dir={run_dir}")
    metrics = read_json(run_dir / "metrics.json")
    assert metrics["status"] == "interrupted" and metrics["signal"] == sig.name
    if sig == signal.SIGTERM:  # waited for the step to end, then saved it
        assert line.startswith("error: stopped by SIGTERM after step 1, checkpoint ")
        assert [p.name for p in list_checkpoints(run_dir)] == ["step-00000001"] and metrics["step"] == 1
    else:  # SIGINT stops at once: nothing saved, the last checkpoint (none here) is where resume=auto starts
        assert line.startswith("error: interrupted by SIGINT; ")
        assert not list_checkpoints(run_dir)
    resumed = run_main(TINY + ["resume=auto", f"hydra.run.dir={run_dir}"])
    assert resumed.returncode == 0, resumed.stderr
    assert read_json(run_dir / "metrics.json")["status"] == "completed"
