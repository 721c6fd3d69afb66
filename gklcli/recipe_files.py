"""Reading recipe files: YAML with limits, `extends:` chains and `--set` overrides, remembering
which file (or `--set`) supplied every dotted key (`Sources`), so that any error names it.

Its own module because it is about files and text, not the schema: `gklcli.recipes` turns the
merged mapping this builds into the typed `Recipe`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from gklcli.errors import GKLError, show

Sources = dict[str, str]
# A recipe is a few hundred values: anything far larger is an alias bomb ("billion laughs") or garbage,
# and is refused before anything walks it (merging, validation, an error message's repr).
MAX_RECIPE_VALUES = 100_000
MAX_RECIPE_DEPTH = 64


def check_size(data: Any, origin: str) -> None:
    """Refuse YAML that expands to more than MAX_RECIPE_VALUES values or nests deeper than
    MAX_RECIPE_DEPTH (YAML aliases share nodes, so the expansion is counted, not built)."""
    count, stack = 0, [(data, 0)]
    while stack:
        node, depth = stack.pop()
        count += 1
        if count > MAX_RECIPE_VALUES:
            raise GKLError(f"{origin}: expands to more than {MAX_RECIPE_VALUES:,} values (a YAML alias bomb?); refused")
        if depth > MAX_RECIPE_DEPTH:
            raise GKLError(f"{origin}: nested deeper than {MAX_RECIPE_DEPTH} levels; refused")
        if isinstance(node, dict):
            count += len(node)
            stack.extend((v, depth + 1) for v in node.values())
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node)


RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


def read_yaml(path: Path, origin: str) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise GKLError(f"{origin}: recipe file not found: {path}") from None
    except OSError as err:
        raise GKLError(f"{origin}: cannot read {path}: {err.strerror}") from None
    except UnicodeDecodeError as err:
        raise GKLError(f"{path}: not UTF-8 text (byte {err.start}); a recipe is a UTF-8 YAML file") from None
    try:
        data = yaml.safe_load(text)
    except RecursionError:
        raise GKLError(f"{path}: nested too deeply to read; refused") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise GKLError(f"{path}:{where}: invalid YAML: {problem}") from None
    if data is None:
        return {}
    check_size(data, str(path))
    if not isinstance(data, dict):
        raise GKLError(f"{path}: a recipe must be a YAML mapping, got {type(data).__name__}")
    return data


def record_sources(data: dict[str, Any], source: str, sources: Sources, prefix: str = "") -> None:
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        sources[dotted] = source
        if isinstance(value, dict):
            record_sources(value, source, sources, dotted + ".")


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_tree(path: Path, sources: Sources, chain: tuple[Path, ...]) -> dict[str, Any]:
    """The merged mapping of `path` and everything it extends, bases first."""
    path = path.resolve()
    if path in chain:
        cycle = " -> ".join(str(p) for p in (*chain, path))
        raise GKLError(f"{path}: extends: cycle {cycle}")
    data = read_yaml(path, str(chain[-1]) if chain else "recipe")
    parents = data.pop("extends", None)
    if parents is None:
        parents = []
    elif isinstance(parents, str):
        parents = [parents]
    elif not (isinstance(parents, list) and all(isinstance(p, str) for p in parents)):
        raise GKLError(f"{path}: extends: must be a path or a list of paths, got {show(parents)}")
    merged: dict[str, Any] = {}
    for parent in parents:
        merged = deep_merge(merged, load_tree(path.parent / parent, sources, (*chain, path)))
    record_sources(data, str(path), sources)
    return deep_merge(merged, data)


def bundled_recipes(pattern: str = "*") -> list[Path]:
    """gkl's own complete recipes (not the partial bases in base/, not the table registry in tables/)."""
    return sorted(p for p in RECIPES_DIR.rglob(f"{pattern}.yaml") if not {"base", "tables"} & set(p.relative_to(RECIPES_DIR).parts))


def resolve_recipe_path(name: str) -> Path:
    """A recipe given as a path, or by name from ./recipes or gkl's own recipes/ folder."""
    candidates = [Path(name)]
    if not name.endswith((".yaml", ".yml")):
        candidates.append(Path(name + ".yaml"))
    for folder in (Path("recipes"), RECIPES_DIR):
        candidates += [folder / c for c in candidates[:2]]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    stem = Path(name).stem if name.endswith((".yaml", ".yml")) else Path(name).name
    found = bundled_recipes(stem)
    if len(found) == 1:  # a bundled recipe in a sub-folder, named without it (kd/… → …)
        return found[0]
    raise GKLError(f"recipe not found: {name} (give a path, or a name from {RECIPES_DIR})")


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` → (['a','b','c'], YAML-typed value)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise GKLError(f"--set {text}: expected KEY=VALUE with a dotted key, e.g. loss.gamma=0.4")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except RecursionError:
        raise GKLError(f"--set {key}: the value is nested too deeply; refused") from None
    except yaml.YAMLError:
        value = raw
    check_size(value, f"--set {key}")
    return key.split("."), value


def apply_override(tree: dict[str, Any], text: str, sources: Sources) -> None:
    path, value = parse_override(text)
    node = tree
    origin = f"--set {text}"
    for i, part in enumerate(path[:-1]):
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
            sources[".".join(path[: i + 1])] = origin  # a section this --set created is its own source
        node = child
    node[path[-1]] = value
    sources[".".join(path)] = origin
    if isinstance(value, dict):
        record_sources(value, origin, sources, ".".join(path) + ".")
