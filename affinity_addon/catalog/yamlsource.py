"""YAML loading that remembers where every mapping and list came from.

Rules errors must name the file and line; plain `yaml.safe_load` forgets both, so mappings and
lists are built as dict/list subclasses carrying their start line and each key's line.
"""

from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml


class LineDict(dict):
    line: int = 0
    key_lines: dict[Any, int]


class LineList(list):
    line: int = 0
    item_lines: list[int]


class _Loader(yaml.SafeLoader):
    pass


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> LineDict:
    loader.flatten_mapping(node)
    d = LineDict()
    d.line = node.start_mark.line + 1
    d.key_lines = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            hash(key)
        except TypeError:
            raise yaml.constructor.ConstructorError(
                None, None, f"unhashable key {key!r}", key_node.start_mark
            ) from None
        if key in d:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        d[key] = loader.construct_object(value_node, deep=True)
        d.key_lines[key] = key_node.start_mark.line + 1
    return d


def _construct_sequence(loader: _Loader, node: yaml.SequenceNode) -> LineList:
    lst = LineList(loader.construct_object(child, deep=True) for child in node.value)
    lst.line = node.start_mark.line + 1
    lst.item_lines = [child.start_mark.line + 1 for child in node.value]
    return lst


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _construct_sequence)


def load_yaml(path: Path) -> Any:
    """Parse a YAML file; raises ValueError("file:line: reason") on syntax errors."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ValueError(f"{path}: cannot read: {e.strerror or e}") from e
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text: {e}") from e
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = f":{mark.line + 1}" if mark else ""
        raise ValueError(f"{path}{line}: {e.problem or e.context}") from e
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: {e}") from e


def line_of(obj: Any, key: Any = None, default: int = 0) -> int:
    """Line of `obj` (or of `obj[key]`'s key) if it came from load_yaml, else `default`."""
    if key is not None and isinstance(obj, LineDict):
        return obj.key_lines.get(key, obj.line)
    if isinstance(obj, LineList) and isinstance(key, int) and 0 <= key < len(obj.item_lines):
        return obj.item_lines[key]
    return getattr(obj, "line", default) or default


class TableError(ValueError):
    """A table entry that does not parse, with the YAML node it is about (for its line)."""

    def __init__(self, message: str, node: Any = None, key: Any = None) -> None:
        super().__init__(message)
        self.line = line_of(node, key) if node is not None else 0


def load_table[T](path: Path, parse: Callable[[Any], T]) -> T:
    """Load a catalog table with `parse`; any problem is a ValueError naming the file and, where
    the parser said which entry, its line."""
    data = load_yaml(path)
    try:
        return parse(data)
    except TableError as e:
        raise ValueError(f"{path}:{e.line}: {e}" if e.line else f"{path}: {e}") from None
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
