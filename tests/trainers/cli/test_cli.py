"""`python main.py` as users run it: bad input gives one line on stderr and a non-zero exit, and never
overwrites an earlier run's files."""

from __future__ import annotations

from pathlib import Path

import pytest
from _trainer_helpers import TINY, assert_one_line_error, read_json, run_main, snapshot


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A completed tiny run (with checkpoints) to try bad resumes and reuses on."""
    run_dir = tmp_path_factory.mktemp("finished")
    proc = run_main(TINY + ["trainer.save_every_steps=2", f"hydra.run.dir={run_dir}"])
    assert proc.returncode == 0, proc.stderr
    return run_dir


@pytest.mark.parametrize(("args", "fragments"), [
    (["adapter=nope"], ["unknown adapter option 'nope'", "choose from: dora, full, gumbel, lora"]),
    (["model=nope"], ["unknown model option 'nope'", "minilm"]),
    (["dataset=nope"], ["unknown dataset option 'nope'", "sst2"]),
    (["lora_alpha=3"], ["unknown config key 'lora_alpha'"]),
    (["adapter.lora_alpah=3"], ["unknown config key 'adapter.lora_alpah'"]),
    (["+adapter.lora_alpah=3"], ["unknown config key 'adapter.lora_alpah'", "lora_alpha"]),
    (["adapter.r=0"], ["adapter.r must be > 0 (got 0)"]),
    (["sparse_lambda=-0.4"], ["sparse_lambda must be >= 0 (got -0.4)"]),
    (["adapter.target_modules=[quuery]"], ["target 'quuery' matches no module", "query"]),
    (["data_root=/nonexistent/data"], ["missing data folder /nonexistent/data/sst2"]),
    (["data_root=null"], ["cannot load dataset sst2", "set data_root="]),
    (["resume=/nonexistent/run"], ["resume=/nonexistent/run: no checkpoint there"]),
    (["model=roberta-base"], ["cannot load tokenizer 'FacebookAI/roberta-base'", "network access"]),
    (["adapter.r=[1"], ["cannot parse the override 'adapter.r=[1'"]),
    (["trainer.base_lr=inf"], ["trainer.base_lr must be a finite number (got inf)"]),
    (["model=smollm2"], ["model smollm2 is a causal LM", "dataset=english_quotes"]),
    (["dataset.max_seq_length=1"], ["dataset.max_seq_length=1 leaves no room for text", "use at least 3"]),
])
def test_bad_input_is_one_line(args, fragments, tmp_path):
    run_dir = tmp_path / "run"
    proc = run_main(TINY + args + [f"hydra.run.dir={run_dir}"])
    assert_one_line_error(proc, *fragments)
    for name in ("metrics.jsonl", "checkpoints", "adapter"):
        assert not (run_dir / name).exists()


def test_full_error_shows_the_traceback(tmp_path):
    proc = run_main(TINY + ["adapter.r=0", f"hydra.run.dir={tmp_path}"], HYDRA_FULL_ERROR="1")
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "adapter.r must be > 0" in proc.stderr


def test_a_fresh_run_that_fails_records_it(tmp_path):
    proc = run_main(TINY + ["adapter.r=0", f"hydra.run.dir={tmp_path}"])
    assert proc.returncode != 0
    assert read_json(tmp_path / "metrics.json") == {"status": "failed", "error": "adapter.r must be > 0 (got 0)"}


def test_an_earlier_run_is_never_overwritten(finished_run):
    before = snapshot(finished_run)
    proc = run_main(TINY + [f"hydra.run.dir={finished_run}"])
    assert_one_line_error(proc, "already holds results", "resume=auto")
    assert snapshot(finished_run) == before


def test_resume_with_a_different_config_is_refused(finished_run):
    before = snapshot(finished_run)
    proc = run_main(TINY + ["adapter.r=4", "resume=auto", f"hydra.run.dir={finished_run}"])
    assert_one_line_error(proc, "does not match this config", "adapter.r=8 -> 4")
    assert snapshot(finished_run) == before  # .hydra/ included


def test_corrupt_checkpoint(finished_run, tmp_path):
    import shutil

    run_dir = tmp_path / "copy"
    shutil.copytree(finished_run, run_dir)
    newest = sorted((run_dir / "checkpoints").iterdir())[-1]
    for name, message in [("adapter.safetensors", "cannot read adapter.safetensors"),
                          ("training_state.pt", "cannot read training_state.pt"),
                          ("trainer_state.json", "cannot read trainer_state.json")]:
        original = (newest / name).read_bytes()
        (newest / name).write_bytes(original[: len(original) // 2])
        before = snapshot(run_dir)
        proc = run_main(TINY + ["resume=auto", f"hydra.run.dir={run_dir}"])
        assert_one_line_error(proc, f"corrupt checkpoint {newest}", message)
        assert snapshot(run_dir) == before  # byte for byte: .hydra/, main.log and .lock included
        (newest / name).write_bytes(original)


def test_checkpoint_that_does_not_fit_the_model(finished_run, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    run_dir = tmp_path / "copy"
    shutil.copytree(finished_run, run_dir)
    newest = sorted((run_dir / "checkpoints").iterdir())[-1]
    weights = load_file(str(newest / "adapter.safetensors"))
    weights.pop(sorted(weights)[0])
    save_file(weights, str(newest / "adapter.safetensors"))
    before = snapshot(run_dir)
    proc = run_main(TINY + ["resume=auto", f"hydra.run.dir={run_dir}"])
    assert_one_line_error(proc, f"checkpoint {newest} does not fit this model", "missing 1 key")
    assert snapshot(run_dir) == before
    assert read_json(run_dir / "metrics.json")["status"] == "completed"  # the earlier result is kept


def test_resume_a_finished_run_changes_nothing(finished_run, tmp_path):
    import shutil

    run_dir = tmp_path / "copy"
    shutil.copytree(finished_run, run_dir)
    before = read_json(run_dir / "metrics.json")
    lines = (run_dir / "metrics.jsonl").read_text()
    proc = run_main(TINY + ["trainer.save_every_steps=2", "resume=auto", f"hydra.run.dir={run_dir}"])
    assert proc.returncode == 0, proc.stderr
    after = read_json(run_dir / "metrics.json")
    assert after["eval_accuracy"] == before["eval_accuracy"] and after["eval_loss"] == before["eval_loss"]
    assert (run_dir / "metrics.jsonl").read_text() == lines


def test_resume_from_a_path_continues_in_a_new_folder(finished_run, tmp_path):
    first = sorted((finished_run / "checkpoints").iterdir())[0]  # an intermediate checkpoint
    proc = run_main(TINY + ["trainer.save_every_steps=2", f"resume={first}", f"hydra.run.dir={tmp_path / 'new'}"])
    assert proc.returncode == 0, proc.stderr
    new, old = read_json(tmp_path / "new" / "metrics.json"), read_json(finished_run / "metrics.json")
    assert (new["eval_accuracy"], new["eval_loss"]) == (old["eval_accuracy"], old["eval_loss"])
    assert (tmp_path / "new" / "metrics.jsonl").read_text() == (finished_run / "metrics.jsonl").read_text()
