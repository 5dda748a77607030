"""Reading YAML the way every file of this project is read: PyYAML's safe loader, except that a key
given twice in one mapping is an error instead of the last one silently winning. Text only here.
"""

from __future__ import annotations

from typing import Any

import yaml
from yaml.constructor import ConstructorError


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a mapping naming one key twice (PyYAML keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node.start_mark)
            except TypeError:  # an unhashable key: let PyYAML's own error say so
                continue
            if first is not key_node.start_mark:
                raise ConstructorError(
                    None,
                    None,
                    f"key {key!r} is given twice (first at line {first.line + 1}); keep one",
                    key_node.start_mark,
                )
        return super().construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _UniqueKeyLoader.construct_mapping
)


def load_yaml(text: str) -> Any:
    """``yaml.safe_load(text)``, refusing a key given twice in one mapping.

    >>> load_yaml("a: 1\\nb: 2")
    {'a': 1, 'b': 2}
    >>> try:
    ...     load_yaml("a: 1\\na: 2")
    ... except yaml.YAMLError as exc:
    ...     yaml_problem(exc)
    " at line 2, column 1: key 'a' is given twice (first at line 1); keep one"
    """
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


def yaml_problem(exc: Exception) -> str:
    """Where and why PyYAML could not read a text, for a message: ``" at line 2, ...: ..."``.

    >>> try:
    ...     yaml.safe_load("a: [1")
    ... except yaml.YAMLError as exc:
    ...     yaml_problem(exc)
    " at line 1, column 6: expected ',' or ']', but got '<stream end>'"
    """
    mark = getattr(exc, "problem_mark", None)
    at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    problem = getattr(exc, "problem", None) or str(exc) or type(exc).__name__
    return f"{at}: {problem}"
