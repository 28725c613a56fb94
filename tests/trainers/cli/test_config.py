"""Config groups compose (Hydra compose API, no training), every key is checked and documented."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from _config import CONF, REPO, compose_config
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import OmegaConf

from trainers.cli.schemas import validate_config
from trainers.core.errors import UserError

GROUPS = ["adapter", "model", "dataset", "schedule", "trainer", "logger"]
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((CONF / g).glob("*.yaml"))]

make = compose_config


def test_every_group_has_the_required_options():
    names = {g: {o for gg, o in OPTIONS if gg == g} for g in GROUPS}
    assert {"lora", "dora", "sora", "sora_official", "gumbel", "loraplus", "sdlora", "full"} <= names["adapter"]
    from trainers.methods import methods

    # every adapter YAML names a plug-in (presets such as sora_official reuse one), every plug-in has its YAML
    named = {OmegaConf.load(CONF / "adapter" / f"{option}.yaml").name for option in names["adapter"]}
    assert named == set(methods()) and set(methods()) <= names["adapter"]
    assert {"minilm", "roberta-base", "deberta-v3-base", "tiny-random-bert"} <= names["model"]
    assert {"sst2", "banking77", "clinc150", "cola", "mrpc", "rte", "stsb", "qnli", "mnli", "qqp"} <= names["dataset"]
    assert "constant" in names["schedule"] and "default" in names["trainer"]


def test_defaults():
    cfg = make()
    assert (cfg.adapter.name, cfg.model.name, cfg.dataset.name, cfg.schedule.name) == ("lora", "minilm", "sst2",
                                                                                      "constant")
    assert cfg.sparse_lambda == 0.0 and cfg.resume is None and cfg.seed == 42
    assert cfg.trainer.warmup_ratio == 0.1 and "gate_warmup_ratio" not in cfg.trainer
    assert cfg.trainer.max_grad_norm == 1.0
    assert cfg.model.modules_to_save == ["classifier"]
    validate_config(cfg)


REQUIRED = {("dataset", "files"): ["dataset.train_file=a.csv", "dataset.eval_file=b.csv"],
            ("dataset", "hub"): ["dataset.path=imdb"]}
PRESETS = {("adapter", "sora_official"): "sora"}  # an option holding another method's settings


@pytest.mark.parametrize(("group", "option"), OPTIONS)
def test_every_option_composes_and_validates(group, option):
    cfg = make([f"{group}={option}", *REQUIRED.get((group, option), [])])
    assert cfg[group].get("name", option) == PRESETS.get((group, option), option) or group == "trainer"
    validate_config(cfg)


def test_group_specific_keys():
    sora = make(["adapter=sora"]).adapter
    assert {"gate_lr", "gate_init", "threshold_mode"} <= set(sora)
    assert (sora.gate_init, sora.threshold_mode) == ("ones", "lr_scaled")
    gumbel = make(["adapter=gumbel"]).adapter
    assert {"tau_init", "tau_final", "anneal_rate", "lambda_sparsity", "growth_threshold"} <= set(gumbel)
    assert (gumbel.tau_init, gumbel.tau_final, gumbel.anneal_rate, gumbel.growth_threshold) == (5.0, 0.5, None, 0.1)
    assert (gumbel.growth_score, gumbel.gate) == ("contribution", "layer")
    for group in ("lora", "dora", "sora", "gumbel"):
        assert {"r", "lora_alpha", "lora_dropout", "target_modules"} <= set(make([f"adapter={group}"]).adapter)
    for option in ("sst2", "banking77", "clinc150"):
        assert {"max_train_samples", "max_eval_samples"} <= set(make([f"dataset={option}"]).dataset)


@pytest.mark.parametrize("group", ["lora", "dora", "sora", "sora_official", "loraplus", "gumbel", "sdlora"])
def test_dropout_sharing_reaches_wrap_linears(group):
    from trainers.methods import get_method

    for sharing in ("shared", "independent"):
        adapter = make([f"adapter={group}", f"adapter.dropout_sharing={sharing}"]).adapter
        assert get_method(adapter.name).adapter_spec(adapter).layer_kwargs["dropout_sharing"] == sharing


def test_sparse_lambda_as_typed():
    cfg = make(["adapter=sora", "sparse_lambda=0.4"])
    assert cfg.sparse_lambda == 0.4
    validate_config(cfg)


def test_data_root_comes_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("DATA_ROOT", str(tmp_path))
    assert make().data_root == str(tmp_path)
    monkeypatch.delenv("DATA_ROOT")
    assert make().data_root is None


def test_unknown_option_and_key_fail_at_composition():
    with pytest.raises(MissingConfigException):
        make(["adapter=nope"])
    with pytest.raises(ConfigCompositionException):
        make(["adapter.lora_alpah=3"])


@pytest.mark.parametrize(("overrides", "message"), [
    (["+adapter.lora_alpah=3"], "unknown config key 'adapter.lora_alpah'"),
    (["+trainer.epoch=3"], "unknown config key 'trainer.epoch'"),
    (["+seeed=1"], "unknown config key 'seeed'"),
    (["adapter.r=0"], "adapter.r must be > 0 (got 0)"),
    (["adapter.r=-2"], "adapter.r must be > 0 (got -2)"),
    (["sparse_lambda=-0.1"], "sparse_lambda must be >= 0 (got -0.1)"),
    (["adapter.lora_dropout=1.0"], "adapter.lora_dropout must be in [0, 1)"),
    (["adapter.dropout_sharing=per_token"], "adapter.dropout_sharing must be one of shared, independent"),
    (["adapter=sora", "adapter.threshold_mode=lr"],
     "adapter.threshold_mode must be one of lr_scaled, soft_absolute, official"),
    (["trainer.precision=fp8"], "trainer.precision must be one of fp32, fp16, bf16"),
    (["trainer.batch_size=0"], "trainer.batch_size must be > 0"),
    (["adapter.r=abc"], "bad value for 'adapter.r'"),
    (["~adapter.lora_alpha"], "lacks required key(s): adapter.lora_alpha"),
])
def test_bad_values_are_one_line_user_errors(overrides, message):
    cfg = make(overrides)
    with pytest.raises(UserError) as info:
        validate_config(cfg)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_yaml_typo_is_caught(tmp_path):
    conf = tmp_path / "conf"
    import shutil

    shutil.copytree(CONF, conf)
    lora = conf / "adapter" / "lora.yaml"
    lora.write_text(lora.read_text().replace("lora_alpha:", "lora_alpah:"))
    cfg = compose_config(conf=conf)
    with pytest.raises(UserError, match="unknown config key 'adapter.lora_alpah'"):
        validate_config(cfg)


def test_run_and_sweep_dirs_are_unique_per_launch():
    cfg = make(hydra=True)
    run_dir, sweep_dir = OmegaConf.select(cfg, "hydra.run.dir"), OmegaConf.select(cfg, "hydra.sweep.dir")
    assert re.fullmatch(r"outputs/\d{4}-\d\d-\d\d/\d\d-\d\d-\d\d-[0-9a-f]{6}", run_dir)
    assert re.fullmatch(r"multirun/\d{4}-\d\d-\d\d/\d\d-\d\d-\d\d-[0-9a-f]{6}", sweep_dir)
    assert OmegaConf.to_container(cfg.hydra.sweep)["subdir"] == "${hydra.job.num}"


def _yaml_keys_without_comment(path: Path) -> list[str]:
    undocumented = []
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"^(\s*)([A-Za-z_][\w-]*):", line)
        if not m or line.strip().startswith("#"):
            continue
        nested_under_documented = m.group(1) and path.parent.name == "model"  # model.config kwargs
        previous = lines[i - 1].strip() if i else ""
        if "#" not in line and not previous.startswith("#") and not nested_under_documented:
            undocumented.append(m.group(2))
    return undocumented


@pytest.mark.parametrize("path", sorted(CONF.glob("**/*.yaml")), ids=lambda p: str(p.relative_to(CONF)))
def test_every_yaml_key_has_a_comment(path):
    assert _yaml_keys_without_comment(path) == []


def test_every_key_is_in_the_docs_table():
    doc = (REPO / "README.md").read_text()
    cfg = make(["adapter=sora"])
    keys = {f"`{k}`" for k in ("seed", "sparse_lambda", "data_root", "resume")}
    for group in ("trainer", "dataset", "model", "logger"):
        keys |= {f"`{group}.{k}`" for k in cfg[group]}
    for adapter in sorted(p.stem for p in (REPO / "conf" / "adapter").glob("*.yaml")):
        keys |= {f"`adapter.{k}`" for k in make([f"adapter={adapter}"]).adapter}
    missing = sorted(k for k in keys if k not in doc)
    assert missing == []
