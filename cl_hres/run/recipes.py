"""YAML run recipes (``--config FILE``, ``strategies/*.yaml``, ``benchmarks/*.yaml``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cl_hres.errors import ConfigError

__all__ = ["load_yaml_config"]


def load_yaml_config(path: str | Path) -> dict[str, Any]:
    """Reads a YAML run recipe into a dict (keys as in :class:`RunConfig`, ``-`` or ``_``).

    Numbers in exponent notation without a dot (``1e-8``) are floats, as in YAML 1.2;
    PyYAML's YAML 1.1 resolver would read them as strings.
    """
    import re

    import yaml

    class _Loader(yaml.SafeLoader):
        pass

    # YAML 1.2's float syntax; PyYAML copies the resolver table before adding to a subclass.
    _Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(
            r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$",
        ),
        list("-+0123456789."),
    )
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        values = yaml.load(path.read_text(), Loader=_Loader)  # a SafeLoader: no objects
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of options at the top level")
    return {str(k).replace("-", "_"): v for k, v in values.items()}
