"""``--help`` of train.py and deploy.py, written from their config files' comments.

The yaml files are the one place a setting is described (a comment on its line); this module reads
them as text and lays them out: the config groups of the root config's ``defaults`` list with their
default and their options (each option file's first comment line when there are few), the settings
of each group's default option and those each other option adds or changes (``with quantize=int8:``),
the optional groups (``+experiment=NAME``), then the root config's own settings. Only the entry script's own config root is read: train.py's help does not list deploy's
groups. The text goes through Hydra's help template (``hydra.help.template``), so ``$`` is escaped.
"""

from __future__ import annotations

import re
import shutil
import textwrap
from collections.abc import Iterable
from pathlib import Path

__all__ = ["config_help"]

_FEW_OPTIONS = 8  # a group with more options lists their names only (the model zoo)
_DEFAULT_ENTRY = re.compile(
    r"^\s*-\s*(?P<override>override\s+)?(?P<group>[\w/]+)\s*:\s*(?P<option>[\w.-]+)\s*(?:#\s*(?P<comment>.*))?$"
)
_KEY = re.compile(r"^(?P<indent> *)(?P<key>[\w.]+):\s*(?P<value>[^#]*?)\s*(?:#\s*(?P<comment>.*))?$")


def config_help(
    config_dir: str | Path, config_name: str, *, usage: str, shown_as: str = "configs", skip: Iterable[str] = ()
) -> str:
    """The help text of the config ``config_dir/config_name.yaml``.

    Args:
        config_dir: The config root (``configs/`` for train.py, ``configs/deploy/`` for deploy.py).
        config_name: The root config's name, without ``.yaml``.
        usage: The first lines: how the script is called and what it does.
        shown_as: ``config_dir`` as the help names it (relative to the repository).
        skip: Folders of ``config_dir`` that are no config group of this root (another script's root).
    """
    config_dir = Path(config_dir)
    root = (config_dir / f"{config_name}.yaml").read_text().splitlines()
    width = min(shutil.get_terminal_size((100, 20)).columns, 120)
    lines = [usage.rstrip(), ""]
    groups = [match for line in root if (match := _DEFAULT_ENTRY.match(line)) and "/" not in match["group"]]
    if groups:
        lines += [f"Config groups (GROUP=OPTION), each a folder of {shown_as}/; the default in brackets:", ""]
    for entry in groups:
        group, option = entry["group"], entry["option"]
        lines += _wrapped(f"  {group}=[{option}]", entry["comment"] or "", width)
        lines += _options(config_dir / group, width)
        default = _group_settings(config_dir / group / f"{option}.yaml", group)
        for key, value, comment in default:
            lines += _wrapped(f"      {key}={value}", comment, width)
        lines += _other_options_settings(config_dir / group, group, option, default, width)
        lines.append("")
    named = {entry["group"] for entry in groups} | set(skip)
    optional = sorted(folder.name for folder in config_dir.iterdir() if folder.is_dir() and folder.name not in named)
    for group in optional:
        lines += [f"  +{group}=NAME  (optional: adds {shown_as}/{group}/NAME.yaml)"]
        lines += _options(config_dir / group, width, describe_all=True) + [""]
    lines += ["Settings (KEY=VALUE):", ""]
    for key, value, comment in _settings(root):
        lines += _wrapped(f"  {key}={value}", comment, width)
    lines += [
        "",
        "Any key can be set: KEY=VALUE, GROUP.KEY=VALUE; +KEY=VALUE adds a key the config lacks.",
        "The composed config, with your overrides: --cfg job.  Hydra's own flags: --hydra-help.",
    ]
    return "\n".join(lines).replace("$", "$$") + "\n"


def _options(folder: Path, width: int, *, describe_all: bool = False) -> list[str]:
    """The options of a group folder: each with its first comment line when there are few, else their names."""
    options = sorted(path for path in folder.glob("*.yaml"))
    if len(options) > _FEW_OPTIONS and not describe_all:
        names = " ".join(path.stem for path in options)
        return textwrap.wrap(names, width, initial_indent="      options: ", subsequent_indent="               ")
    lines = []
    for path in options:
        lines += _wrapped(f"      {path.stem}", _header(path), width)
    return lines


def _group_settings(path: Path, group: str) -> list[tuple[str, str, str]]:
    """(key as set on the command line, value, comment) of a group option's settings.

    A ``# @package _global_`` file sets keys from the root (``loss.alpha``, ``model.drop_rate``);
    a group of nodes (callbacks) is left to the names and comments above it.
    """
    text = path.read_text()
    if re.search(r"^#\s*@package\s+_global_\s*$", text, re.MULTILINE):
        return _settings(text.splitlines())
    return [
        (f"{group}.{key}", value, comment) for key, value, comment in _settings(text.splitlines()) if "." not in key
    ]


def _other_options_settings(
    folder: Path, group: str, default: str, shown: list[tuple[str, str, str]], width: int
) -> list[str]:
    """For each other option of a group with few options, the settings it adds or sets otherwise than the default.

    So that every setting is listed (deploy's ``quantize=int8`` group: ``quantize.engines``, ``max_drop``, ...),
    each under the option that brings it.
    """
    options = sorted(path for path in folder.glob("*.yaml") if path.stem != default)
    if len(options) + 1 > _FEW_OPTIONS:  # the model zoo: an option is a model, its settings are the model's
        return []
    defaults = {key: value for key, value, _ in shown}
    lines = []
    for path in options:
        changed = [entry for entry in _group_settings(path, group) if defaults.get(entry[0]) != entry[1]]
        if changed:
            lines.append(f"      with {group}={path.stem}:")
            for key, value, comment in changed:
                lines += _wrapped(f"        {key}={value}", comment, width)
    return lines


def _header(path: Path) -> str:
    """The first sentence of a config file's opening comment, past any ``@package`` directive and usage example."""
    words = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        text = line.lstrip("#").strip()
        if text and not text.startswith(("@package", "python ")):
            words.append(text)
    sentence = " ".join(words)
    end = sentence.find(". ")
    return sentence if end < 0 else sentence[: end + 1]


def _settings(lines: list[str]) -> list[tuple[str, str, str]]:
    """(dotted key, value, comment) of the settings in a yaml file's text, nested nodes flattened; ``hydra`` left out."""
    found, parents = [], []
    for line in lines:
        match = _KEY.match(line)
        if not match or line.lstrip().startswith("#"):
            continue
        depth = len(match["indent"]) // 2
        parents = parents[:depth]
        key, value, comment = match["key"], match["value"], match["comment"] or ""
        if value == "":  # a node: its keys follow, one level deeper
            parents.append(key)
            continue
        path = [*parents, key]
        if path[0] in ("defaults", "hydra") or key.startswith("_"):
            continue
        found.append((".".join(path), value, comment))
    return found


def _wrapped(head: str, comment: str, width: int) -> list[str]:
    """``head`` and its comment on one line, the comment wrapped under itself when long."""
    if not comment:
        return [head]
    column = max(len(head) + 2, 30)
    return textwrap.wrap(
        comment, width, initial_indent=head.ljust(column), subsequent_indent=" " * column, break_on_hyphens=False
    ) or [head]
