"""Every config file composes, and every object it names resolves: generated from the files in configs/.

Each option of each train config group is composed into the root config as ``python train.py
group=option`` would, and each ``+experiment=`` too; each ``_target_`` is imported (not built:
building the ImageNet recipe would need ImageNet). The deploy config and its experiments compose
and pass deploy's own settings checks.
"""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import get_object
from omegaconf import OmegaConf

from repblocks.deploy.config import DeployConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TRAIN_GROUPS = sorted(p.name for p in CONFIGS.iterdir() if p.is_dir() and p.name not in ("deploy", "experiment"))
TRAIN_OPTIONS = [f"{group}={path.stem}" for group in TRAIN_GROUPS for path in sorted((CONFIGS / group).glob("*.yaml"))]
TRAIN_OPTIONS += [f"+experiment={path.stem}" for path in sorted((CONFIGS / "experiment").glob("*.yaml"))]
DEPLOY_OPTIONS = [""] + [f"+experiment={p.stem}" for p in sorted((CONFIGS / "deploy" / "experiment").glob("*.yaml"))]


def _targets(node) -> list[str]:
    """Every ``_target_`` in a composed config, nested ones included."""
    if isinstance(node, dict):
        found = [node["_target_"]] if "_target_" in node else []
        return found + [target for value in node.values() for target in _targets(value)]
    if isinstance(node, list):
        return [target for value in node for target in _targets(value)]
    return []


@pytest.mark.parametrize("override", TRAIN_OPTIONS)
def test_every_train_config_composes_and_names_importable_objects(override, tmp_path):
    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        cfg = compose("train", overrides=[override, f"paths.output_dir={tmp_path}"])
    resolved = OmegaConf.to_container(cfg, resolve=True)
    targets = _targets(resolved)
    assert targets, f"{override}: nothing to build"
    for target in targets:
        assert callable(get_object(target)), f"{override}: {target} is not callable"
    if override.startswith("+experiment="):  # an experiment changes what it says it changes, and only that
        with initialize_config_dir(str(CONFIGS), version_base="1.3"):
            base = OmegaConf.to_container(compose("train", overrides=[f"paths.output_dir={tmp_path}"]), resolve=True)
        assert resolved != base


@pytest.mark.parametrize("override", DEPLOY_OPTIONS, ids=lambda o: o or "deploy.yaml")
def test_every_deploy_config_passes_the_settings_checks(override, tmp_path):
    overrides = [override] if override else []
    with initialize_config_dir(str(CONFIGS / "deploy"), version_base="1.3"):
        cfg = compose("deploy", overrides=[*overrides, f"out_dir={tmp_path}"])
    config = DeployConfig.from_dict(OmegaConf.to_container(cfg, resolve=True))
    assert config.out_dir == str(tmp_path)
    if override == "+experiment=paper_speed":
        assert "repvgg_a0" in config.models and "torchvision:resnet18" in config.models
