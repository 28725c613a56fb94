"""The architecture as tests: trainers/ layers import only downward, the loop names no method, adapters/ is a
library that knows nothing of training, and every method plug-in has its YAML."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from _config import CONF, REPO

LAYERS = ["core", "data", "models", "objectives", "loop", "methods", "reports", "experiments", "cli"]
METHOD_WORDS = re.compile(r"lora|dora|sora|gumbel|gate|sparse_lambda", re.IGNORECASE)


def imported_modules(path: Path) -> list[str]:
    """Every absolute module an import statement in ``path`` names (TYPE_CHECKING blocks included)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
    return names


@pytest.mark.parametrize("layer", LAYERS)
def test_layers_import_only_downward(layer):
    allowed = set(LAYERS[: LAYERS.index(layer) + 1])
    for path in sorted((REPO / "trainers" / layer).glob("*.py")):
        for module in imported_modules(path):
            parts = module.split(".")
            if parts[0] == "trainers" and len(parts) > 1:
                assert parts[1] in allowed, f"{path.relative_to(REPO)} imports {module} (above {layer})"


def test_the_loop_names_no_method():
    for path in sorted((REPO / "trainers" / "loop").glob("*.py")):
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            assert not METHOD_WORDS.search(line), f"{path.relative_to(REPO)}:{number}: {line.strip()}"


def test_adapters_know_nothing_of_training():
    for path in sorted((REPO / "adapters").glob("*.py")):
        for module in imported_modules(path):
            assert module.split(".")[0] not in ("trainers", "hydra", "omegaconf"), f"{path.name} imports {module}"


def test_every_method_plugin_has_its_yaml_and_schema():
    from trainers.methods import methods

    for name, method in methods().items():
        cfg = (CONF / "adapter" / f"{name}.yaml").read_text(encoding="utf-8")
        assert f"name: {name}" in cfg
        keys = {line.split(":")[0] for line in cfg.splitlines() if line and not line.startswith((" ", "#"))}
        assert keys == set(method.schema.__dataclass_fields__), name
