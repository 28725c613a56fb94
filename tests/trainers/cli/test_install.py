"""The installable CLI: a built wheel holds the config groups, and its ``lora-lab`` script, run from another
folder, behaves as ``python main.py``."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile

import pytest
from _trainer_helpers import REPO, cli_env, read_json, run_main

pytest.importorskip("setuptools", minversion="70.1")  # builds wheels by itself (no `wheel` package needed)

ARGS = ["model=tiny-random-bert", "dataset.max_train_samples=16", "dataset.max_eval_samples=8", "trainer.batch_size=8"]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(site folder, console script): the wheel built from this tree, installed with --target (not editable)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(REPO, src, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", "outputs", "multirun", ".venv", "__pycache__", "*.egg-info", ".*_cache", "build", "dist"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist"), str(src)],
                   check=True, capture_output=True, timeout=300)
    wheel = next((tmp / "dist").glob("lora_lab-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "trainers/conf/config.yaml" in names and "trainers/conf/adapter/sora.yaml" in names
    assert "trainers/cli/entry.py" in names
    site = tmp / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True,
                   capture_output=True, timeout=300)
    return site, site / "bin" / "lora-lab"


def _env(site):
    env = cli_env()
    env["PYTHONPATH"] = str(site)  # the installed copy, not this checkout
    return env


def test_console_script_trains_from_another_folder(installed, tmp_path):
    site, script = installed
    where = subprocess.run([sys.executable, "-c", "import trainers; print(trainers.__file__)"], cwd=tmp_path,
                           env=_env(site), capture_output=True, text=True, check=True)
    assert where.stdout.strip().startswith(str(site))
    proc = subprocess.run([str(script), "adapter=sora", "sparse_lambda=0.4", *ARGS, "hydra.run.dir=run"], cwd=tmp_path,
                          env=_env(site), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    metrics = read_json(tmp_path / "run" / "metrics.json")
    assert metrics["status"] == "completed" and "nonzero_adapter_params" in metrics
    assert (tmp_path / "run" / "main.log").is_file()
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()


def test_console_script_composes_as_main_py(installed, tmp_path):
    site, script = installed
    args = ["--cfg", "job", "adapter=dora", "logger=csv", *ARGS]
    ours = subprocess.run([str(script), *args], cwd=tmp_path, env=_env(site), capture_output=True, text=True,
                          timeout=120)
    theirs = run_main(args)
    assert ours.returncode == theirs.returncode == 0
    assert ours.stdout == theirs.stdout and "name: dora" in ours.stdout


def test_console_script_errors_as_main_py(installed, tmp_path):
    site, script = installed
    proc = subprocess.run([str(script), "adapter=nope"], cwd=tmp_path, env=_env(site), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == run_main(["adapter=nope"]).stderr.strip().splitlines()
    assert proc.stderr.startswith("error: unknown adapter option 'nope'")
