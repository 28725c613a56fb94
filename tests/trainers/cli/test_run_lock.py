"""One writer per run folder: an OS lock held for the whole run, a second writer refused with one line naming
the holder, the folder left as it was, and no stale lock after a killed run."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _trainer_helpers import REPO, TINY, assert_one_line_error, cli_env, read_json, run_main, snapshot, stderr_lines

from trainers.core.errors import UserError
from trainers.core.lock import LOCK_FILE, claim_dir, holds_lock, lock_dir, unlock_dir

HOLD = ("import sys, time; from trainers.core.lock import lock_dir, claim_dir; "
        "lock_dir(sys.argv[1], 'x'); claim_dir(sys.argv[1]); print('ready', flush=True); time.sleep(120)")


@pytest.fixture
def holder():
    """Start a process that locks a folder; yields ``start(folder) -> Popen``; kills it at the end."""
    procs = []

    def start(folder: Path) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], env=cli_env(), cwd=REPO,
                                stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        assert proc.stdout.readline().strip() == "ready"
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_lock_in_process(tmp_path, holder):
    folder = tmp_path / "run"
    assert lock_dir(folder, "hint") and holds_lock(folder)
    assert lock_dir(folder, "hint") is False  # held by this process already
    unlock_dir(folder, refused=True)  # nothing was claimed: the lock file and the folder this created go away
    assert not folder.exists()

    proc = holder(folder)
    with pytest.raises(UserError, match=f"is in use by another run \\(pid {proc.pid} on host "
                                        f"{socket.gethostname()} since .*\\); wait for it to end or hint"):
        lock_dir(folder, "hint")
    proc.send_signal(signal.SIGKILL)  # a killed holder leaves no stale lock
    proc.wait()
    assert lock_dir(folder, "hint")
    claim_dir(folder)
    assert read_json(folder / LOCK_FILE)["pid"] == os.getpid()
    unlock_dir(folder, refused=True)
    assert (folder / LOCK_FILE).is_file()  # claimed: the file stays (it names the last holder)


def test_second_run_into_a_locked_folder_is_refused(tmp_path, holder):
    run_dir = tmp_path / "run"
    proc = holder(run_dir)
    before = snapshot(run_dir)
    refused = run_main(TINY + [f"hydra.run.dir={run_dir}"])
    assert_one_line_error(refused, f"{run_dir} is in use by another run (pid {proc.pid} on host",
                          "choose another hydra.run.dir")
    assert snapshot(run_dir) == before and sorted(p.name for p in run_dir.iterdir()) == [LOCK_FILE]
    proc.kill()
    proc.wait()
    done = run_main(TINY + [f"hydra.run.dir={run_dir}"])  # the killed holder's lock is gone with it
    assert done.returncode == 0, done.stderr


def test_second_sweep_into_a_locked_sweep_folder_is_refused(tmp_path, holder):
    sweep_dir = tmp_path / "sweep"
    holder(sweep_dir)
    refused = run_main(["-m", *TINY, "adapter.r=2,4", f"hydra.sweep.dir={sweep_dir}"])
    assert_one_line_error(refused, f"{sweep_dir} is in use by another run", "choose another hydra.sweep.dir")
    assert sorted(p.name for p in sweep_dir.iterdir()) == [LOCK_FILE]


def test_two_runs_into_one_folder(tmp_path):
    """The issue's case: lora and dora started into one folder both exited 0 and mixed their files."""
    run_dir, flag, release = tmp_path / "run", tmp_path / "started", tmp_path / "release"
    first = subprocess.Popen(
        [sys.executable, str(REPO / "main.py"), *TINY, "adapter=lora", f"hydra.run.dir={run_dir}",
         "+trainer.callbacks.pause._target_=_fault_helpers.PauseAtStart", f"+trainer.callbacks.pause.flag={flag}",
         "+trainer.callbacks.pause.seconds=200", f"+trainer.callbacks.pause.release={release}"],
        cwd=REPO, env=cli_env(PYTHONPATH=f"{REPO}{os.pathsep}{REPO / 'tests'}"), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not flag.exists():
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()[1]
            time.sleep(0.1)
        second = run_main(TINY + ["adapter=dora", f"hydra.run.dir={run_dir}"])
        assert_one_line_error(second, f"is in use by another run (pid {first.pid} on host")
        assert len(stderr_lines(second)) == 1
    finally:
        release.write_text("go on")  # the first run waits in its first hook until the second one was refused
        out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert "name: lora" in (run_dir / ".hydra" / "config.yaml").read_text()
    assert read_json(run_dir / "metrics.json")["status"] == "completed"
    assert read_json(run_dir / "adapter" / "adapter_config.json")["use_dora"] is False


def test_a_read_only_folder_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    """(As root every folder is writable, so the permission check is simulated.)"""
    folder = tmp_path / "run"
    folder.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if Path(path) == folder else real_access(path, mode))
    with pytest.raises(UserError, match=f"^{folder} is not writable by this user; make it writable or hint$"):
        lock_dir(folder, "hint")
    assert list(folder.iterdir()) == []
