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


def _leaves(node, prefix: str = "") -> dict[str, object]:
    """``{dotted.path: value}`` of every leaf of a config container (a list is one leaf, an empty dict too)."""
    if isinstance(node, dict) and node:
        return {path: value for key, child in node.items() for path, value in _leaves(child, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): node}


def _composed(config_dir: Path, name: str, overrides: list[str]) -> dict[str, object]:
    with initialize_config_dir(str(config_dir), version_base="1.3"):
        return _leaves(OmegaConf.to_container(compose(name, overrides=overrides), resolve=False))


EXPERIMENTS = [(CONFIGS, "train", path) for path in sorted((CONFIGS / "experiment").glob("*.yaml"))]
EXPERIMENTS += [(CONFIGS / "deploy", "deploy", p) for p in sorted((CONFIGS / "deploy" / "experiment").glob("*.yaml"))]


@pytest.mark.parametrize(("config_dir", "name", "path"), EXPERIMENTS, ids=lambda x: getattr(x, "stem", None))
def test_an_experiment_changes_what_it_says_and_only_that(config_dir, name, path, tmp_path):
    """Composed with and without the experiment, the configs differ exactly where the experiment's file sets a value.

    A changed key must lie under a key the file sets (a node it sets to null drops everything under
    it, a null node it fills is replaced) or under a group its ``defaults`` list overrides; and every value the file sets is in the
    composed config. Compared before interpolation, so a value that only refers to another
    (``${qat.epochs}``) is what the file wrote.
    """
    where = [f"paths.output_dir={tmp_path}"] if name == "train" else [f"out_dir={tmp_path}"]
    base = _composed(config_dir, name, where)
    with_experiment = _composed(config_dir, name, [*where, f"+experiment={path.stem}"])
    written = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    groups = [
        next(iter(entry)).split()[-1].lstrip("/") for entry in written.pop("defaults", []) if isinstance(entry, dict)
    ]
    said = _leaves(written)
    changed = {
        key for key in base.keys() | with_experiment.keys() if base.get(key, ...) != with_experiment.get(key, ...)
    }
    assert changed, f"{path.name} changes nothing"
    for key in sorted(changed):  # under what the file sets, or a node it fills (mixup: null -> {...})
        inside = any(key == p or key.startswith(f"{p}.") or p.startswith(f"{key}.") for p in [*said, *groups])
        assert inside, f"{path.name} also changes {key}"
    for key, value in said.items():
        if value is not None or key in with_experiment:
            assert with_experiment.get(key) == value, (
                f"{path.name} sets {key}={value!r}, composed {with_experiment.get(key)!r}"
            )


@pytest.mark.parametrize("override", DEPLOY_OPTIONS, ids=lambda o: o or "deploy.yaml")
def test_every_deploy_config_passes_the_settings_checks(override, tmp_path):
    overrides = [override] if override else []
    with initialize_config_dir(str(CONFIGS / "deploy"), version_base="1.3"):
        cfg = compose("deploy", overrides=[*overrides, f"out_dir={tmp_path}"])
    config = DeployConfig.from_dict(OmegaConf.to_container(cfg, resolve=True))
    assert config.out_dir == str(tmp_path)
    if override == "+experiment=paper_speed":
        assert "repvgg_a0" in config.models and "torchvision:resnet18" in config.models
