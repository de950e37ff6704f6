"""The config's keys as a user meets them: a key the config does not have, caught before anything
runs and answered with the closest known ones, what a preset sets, and where each fusion setting in
force came from (the printed summary and results.json ``fusion_settings``)."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterable, Mapping

from omegaconf import OmegaConf

from tfuse.errors import TfuseError, check_fusion_keys, unknown_key

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
PRESET_GROUPS = ("experiment", "ablation")  # appended with +GROUP=NAME; their files set keys anywhere
COMMAND_LINE, DEFAULT = "command line", "package defaults"


def override_key(override: str) -> str:
    """The key an override sets: ``+fusion.reg=0.1`` -> ``fusion.reg``, ``fusion=vanilla`` -> ``fusion``."""
    return override.split("=", 1)[0].lstrip("~+").split("@", 1)[0]


def dotted_keys(data: Mapping, prefix: str = "") -> list[str]:
    """Every key of a nested mapping, dotted (``fusion``, ``fusion.reg``, ...); lists are not entered."""
    keys = []
    for key, value in data.items():
        keys.append(f"{prefix}{key}")
        if isinstance(value, Mapping):
            keys += dotted_keys(value, f"{prefix}{key}.")
    return keys


def known_fusion_settings() -> set[str]:
    """Every method's settings (the ``fusion`` group is shared; each method ignores the others')."""
    from tfuse.fusion.methods import METHODS

    return set().union(*(METHODS[name].settings_class.known() for name in METHODS))


def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("config", overrides=overrides)


def _group_selection(override: str) -> bool:
    key = override_key(override)
    return "." not in key and (CONFIG_DIR / key).is_dir()


def _known_keys(overrides: list[str]) -> list[str]:
    """The config's keys under the overrides' group selections (``+experiment=``, ``fusion=``, ...)."""
    for given in ([o for o in overrides if _group_selection(o)], []):
        try:
            return dotted_keys(OmegaConf.to_container(_compose(given), resolve=False))
        except Exception:  # noqa: BLE001 - a selection Hydra refuses: the plain config's keys
            continue
    return []


def check_overrides(overrides: list[str], fusion: bool = True) -> None:
    """Compose the config as Hydra will, before anything runs: a key the config does not have, a
    group option it does not know or (``fusion``) a fusion setting no method knows raises a
    TfuseError naming the closest known ones. A sweep is checked with each axis's first value;
    ``hydra`` overrides, and whatever else Hydra would refuse, are left to Hydra."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import ConfigCompositionException, MissingConfigException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception:  # noqa: BLE001 - a syntax error: Hydra's own message
        return
    plain = []
    for override in parsed:
        if override.is_hydra_override():
            continue
        if override.is_sweep_override():
            try:
                plain.append(f"{override.get_key_element()}={next(iter(override.sweep_string_iterator()))}")
            except Exception:  # noqa: BLE001 - a sweep that cannot be listed here (glob, interval)
                continue
        else:
            plain.append(override.input_line)
    try:
        cfg = _compose(plain)
    except MissingConfigException as err:
        group, _, name = (err.missing_cfg_file or "").rpartition("/")
        if group and err.options:
            raise unknown_key(name, [o for o in err.options if o != "common"], group) from None
        return
    except ConfigCompositionException as err:
        found = re.search(r"Could not (?:override|delete from config\.) '([^']+)'", str(err))
        if found and (isinstance(err.__cause__, (ConfigAttributeError, ConfigKeyError)) or "does not exist" in str(err)):
            key = found.group(1)
            owners = sorted(p.stem for p in (CONFIG_DIR / "fusion").glob("*.yaml")
                            if key.startswith("fusion.") and key[7:] in (OmegaConf.load(p) or {}))
            if owners:  # another method's knob: its file is not the one selected
                raise TfuseError(f"{key} is a setting of fusion={' / fusion='.join(owners)}, not of the selected fusion file; "
                                 f"select that one (fusion=NAME) or drop {key}") from None
            raise unknown_key(key, _known_keys(plain)) from None
        return
    except Exception:  # noqa: BLE001 - anything else: Hydra reports it as it always has
        return
    if fusion and "fusion" in cfg:  # the method files' keys: tested equal to the settings classes' (which import torch)
        check_fusion_keys(cfg.fusion, fusion_file_keys())


def fusion_file_keys() -> set[str]:
    """The keys configs/fusion/*.yaml set: every method's knobs."""
    keys: set[str] = set()
    for path in (CONFIG_DIR / "fusion").glob("*.yaml"):
        keys |= set(OmegaConf.load(path)) - {"defaults"}
    return keys


def preset(group: str, name: str) -> tuple[dict, dict[str, str]]:
    """What a preset file (``@package _global_``) sets over the presets of its group it builds on:
    its keys, nested, and its group choices (``override /data: mnist5k`` -> ``{"data": "mnist5k"}``)."""
    path = CONFIG_DIR / group / f"{name}.yaml"
    if not path.is_file():
        return {}, {}
    raw = OmegaConf.to_container(OmegaConf.load(path), resolve=False) or {}
    body: Any = {}
    groups: dict[str, str] = {}
    for entry in raw.pop("defaults", None) or []:
        if isinstance(entry, str) and entry != "_self_" and not entry.startswith("/"):
            base, base_groups = preset(group, entry)
            body = OmegaConf.merge(body, base)
            groups.update(base_groups)
        elif isinstance(entry, dict):
            groups.update({k.replace("override", "").strip().strip("/"): str(v) for k, v in entry.items()})
    return OmegaConf.to_container(OmegaConf.merge(body, raw), resolve=False), groups


def describe_preset(group: str, name: str, given: Iterable[str] = ()) -> str:
    """``data=mnist5k fusion.solver=emd ... finetune.steps=200``: the preset's data choice, fusion
    and finetune settings, leaving out the keys in ``given`` (set on the command line)."""
    body, groups = preset(group, name)
    given = set(given)
    pairs = [(k, v) for k, v in groups.items() if k == "data"]
    for section in ("data", "fusion", "finetune"):
        values = body.get(section) or {}
        pairs += [(f"{section}.{k}", v) for k, v in values.items() if not isinstance(v, Mapping)]
    return " ".join(f"{k}={show(v)}" for k, v in pairs if k not in given)


def show(value: Any) -> str:
    """A value as an override would write it: ``null``, ``true``, ``[0.5,0.5]``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(show(v) for v in value) + "]"
    return str(value)


def fusion_sources(settings: Mapping[str, Any], overrides: Iterable[str] | None, choices: Mapping[str, Any]) -> dict[str, dict]:
    """Each fusion setting in force (``settings``, as resolved), its value and where it came from:
    ``command line`` (an override of ``fusion.KEY``; for ``method`` also ``fusion=NAME``, for
    ``seed`` also ``seed``; a sweep's values are its jobs' overrides), ``experiment NAME`` (the
    preset or one it builds on), else ``package defaults`` (configs/fusion/, the settings
    dataclass). ``overrides`` None (no Hydra run): every source is ``config``."""
    if overrides is None:
        return {key: {"value": value, "source": "config"} for key, value in settings.items()}
    given = {override_key(o) for o in overrides}
    presets: dict[str, str] = {}
    for group in PRESET_GROUPS:
        name = choices.get(group)
        if name:
            body, groups = preset(group, str(name))
            for key in [*(body.get("fusion") or {}), *(["method"] if "fusion" in groups else [])]:
                presets.setdefault(key, f"{group} {name}")

    def source(key: str) -> str:
        if f"fusion.{key}" in given:
            return COMMAND_LINE
        if key in presets:
            return presets[key]
        if (key == "method" and "fusion" in given) or (key == "seed" and "seed" in given):
            return COMMAND_LINE
        return DEFAULT

    return {key: {"value": value, "source": source(key)} for key, value in settings.items()}


def sources_summary(found: Mapping[str, Mapping]) -> str:
    """The printed block: one line per source (command line first, package defaults last)."""
    by_source: dict[str, list[str]] = {}
    for key, entry in found.items():
        by_source.setdefault(entry["source"], []).append(f"{key}={show(entry['value'])}")
    order = sorted(by_source, key=lambda s: (s != COMMAND_LINE, s == DEFAULT, s))
    return "\n".join(["fusion settings in force, by source:"] + [f"  {s}: {' '.join(by_source[s])}" for s in order])
