"""Config groups compose (Hydra compose API, no training), every key is checked and documented."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import OmegaConf

from trainers.cli.run_id import register_resolvers
from trainers.cli.schemas import validate_config
from trainers.core.errors import UserError

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
GROUPS = ["adapter", "model", "dataset", "schedule", "trainer", "logger"]
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((CONF / g).glob("*.yaml"))]

register_resolvers()


def make(overrides: list[str] | None = None, hydra: bool = False):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=overrides or [], return_hydra_config=hydra)


def test_every_group_has_the_required_options():
    names = {g: {o for gg, o in OPTIONS if gg == g} for g in GROUPS}
    assert names["adapter"] == {"lora", "dora", "sora", "gumbel"}
    assert {"minilm", "roberta-base", "deberta-v3-base", "tiny-random-bert"} <= names["model"]
    assert {"sst2", "banking77", "clinc150"} <= names["dataset"]
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


@pytest.mark.parametrize(("group", "option"), OPTIONS)
def test_every_option_composes_and_validates(group, option):
    cfg = make([f"{group}={option}"])
    assert cfg[group].get("name", option) == option or group == "trainer"
    validate_config(cfg)


def test_group_specific_keys():
    sora = make(["adapter=sora"]).adapter
    assert {"gate_lr", "gate_init", "threshold_mode"} <= set(sora)
    assert (sora.gate_init, sora.threshold_mode) == ("ones", "lr_scaled")
    gumbel = make(["adapter=gumbel"]).adapter
    assert {"tau_init", "tau_final", "anneal_rate", "lambda_sparsity", "growth_threshold"} <= set(gumbel)
    assert (gumbel.tau_init, gumbel.tau_final, gumbel.anneal_rate, gumbel.growth_threshold) == (5.0, 0.5, 0.999, 0.1)
    for group in ("lora", "dora", "sora", "gumbel"):
        assert {"r", "lora_alpha", "lora_dropout", "target_modules"} <= set(make([f"adapter={group}"]).adapter)
    for option in ("sst2", "banking77", "clinc150"):
        assert {"max_train_samples", "max_eval_samples"} <= set(make([f"dataset={option}"]).dataset)


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
    (["adapter=sora", "adapter.threshold_mode=lr"], "adapter.threshold_mode must be lr_scaled or absolute"),
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
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose("config")
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
