"""The registry of the paper's tables: one YAML file per table in `recipes/tables/`.

A table file gives the paper's title and columns, and one entry per row: its text cells
(`labels`), the paper's number for every numeric column (`paper`), and how gkl produces each of
those numbers — a recipe (+ `--set` overrides) and a metric. Rows from methods the paper only cites
are `cited: true`; tables that need capabilities gkl lacks are `status: unsupported` with a reason.

Keys of a table file::

    name, paper (gkl | ikl), title, columns
    metrics: {column: metric}      numeric columns and what fills them (or `metric:` for all)
    column_recipes: {column: stem} with a row's `suffix:`, the recipe of each column
    rows: - labels: [...]          the text columns, in order
            paper: [...]           the numeric columns, in order (null: no value in the paper)
            recipe / set           the run of every numeric cell of the row
            runs: {column: recipe or {recipe, set}}   per-cell runs
            metric / metrics       per-row metric overrides
            cited, note, section
    status, reason, includes, figures

Metrics: clean, aa, aa@E (AutoAttack at ε = E), pgd-K, cw-K, worst, apgd-ce, apgd-t (each alone),
mean(m1,m2,...) for adversarial training; top1, top5, many, medium, few, s_iter, teacher_top1,
ood:imagenet-r, ood:imagenet-sketch for distillation. `top1` is the last epoch's test top-1;
`top1@best` (also top5/many/medium/few@best, at the epoch of the best top-1) the best test top-1 over
epochs, mdistiller's protocol that the paper's CIFAR-100 and ImageNet KD tables report; its recipe
must evaluate the test set every epoch (`eval.test_every_epochs`), and reports label such cells.
zeroshot:D (D = imagenet, imagenet-v2, imagenet-sketch, imagenet-r) is a CLIP run's zero-shot top-1 and
teacher_zeroshot:D its pretrained teacher's (kind clip-kd). miou, pixel_acc and mean_acc are a segmentation
run's (kind seg-kd) on ADE20K's validation split, teacher_miou its teacher's. A semi-supervised run (kind semi) reports the
classification metrics of its test evaluations as well: top1, top5, s_iter, top1@best and top5@best.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from gklcli.errors import GKLError
from gklcli.recipes import RECIPES_DIR

TABLES_DIR = RECIPES_DIR / "tables"
AT_METRIC = re.compile(r"^(clean|aa|aa@\d+(\.\d+)?/255|pgd-\d+|cw-\d+|worst|apgd-ce|apgd-t|apgd-dlr|fab-t|square)$")
KD_METRIC = re.compile(r"^(top1|top5|many|medium|few|s_iter|teacher_top1|ood:imagenet-r|ood:imagenet-sketch)$")
# `top1@best`: the run's best test value over epochs (mdistiller's protocol, eval.test_every_epochs > 0)
# rather than the last epoch's; many/medium/few/top5@best are those of the epoch with the best top-1
KD_BEST = re.compile(r"^(top1|top5|many|medium|few)@best$")
MEAN = re.compile(r"^mean\((.+)\)$")
CLIP_METRIC = re.compile(r"^(teacher_)?zeroshot:(imagenet|imagenet-v2|imagenet-sketch|imagenet-r)$")
# kind seg-kd (TABLE XXIII): the last epoch's mIoU on the validation split (also pixel_acc, mean_acc), the teacher's
SEG_METRIC = re.compile(r"^(teacher_)?(miou|pixel_acc|mean_acc)$|^s_iter$")
# the 'kd' metrics that a semi-supervised run (kind semi) also produces: its test evaluations, per epoch and last
SEMI_METRIC = re.compile(r"^(top1|top5|s_iter|top1@best|top5@best)$")


@dataclass(frozen=True)
class RunSpec:
    """A recipe and its overrides: what one training run (per seed) is made of."""

    recipe: str
    overrides: tuple[str, ...] = ()


@dataclass
class Cell:
    column: str
    paper: Optional[float]
    metric: Optional[str] = None
    run: Optional[RunSpec] = None


@dataclass
class Row:
    index: int  # 1-based, as printed
    labels: dict[str, str]
    cells: list[Cell]
    cited: bool = False
    note: str = ""
    section: Optional[str] = None

    @property
    def label(self) -> str:
        return " · ".join(v for v in self.labels.values() if v) or f"row {self.index}"

    @property
    def runnable(self) -> bool:
        return any(c.run is not None for c in self.cells)


@dataclass
class Figure:
    kind: str  # margins | scores | tsne
    rows: list[str]
    column: str
    caption: str


@dataclass
class Table:
    name: str
    paper: str
    title: str
    columns: list[str]
    numeric: list[str]
    rows: list[Row]
    path: Path
    status: str = "runnable"
    reason: str = ""
    includes: list[str] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)

    @property
    def text_columns(self) -> list[str]:
        return [c for c in self.columns if c not in self.numeric]


def metric_parts(metric: str) -> list[str]:
    """The plain metrics a (possibly `mean(...)`) metric is made of."""
    match = MEAN.match(metric)
    return [m.strip() for m in match.group(1).split(",")] if match else [metric]


def is_best_metric(metric: str) -> bool:
    """Whether the metric (or a part of a `mean(...)`) is a best-over-epochs test value (`top1@best`)."""
    return any(KD_BEST.match(m) for m in metric_parts(metric))


def metric_kind(metric: str) -> str:
    """'at', 'kd', 'clip-kd' or 'seg-kd': which kind of recipe can produce the metric."""
    kinds = {"at" if AT_METRIC.match(m) else "kd" if KD_METRIC.match(m) or KD_BEST.match(m) else
             "clip-kd" if CLIP_METRIC.match(m) else "seg-kd" if SEG_METRIC.match(m) else "?" for m in metric_parts(metric)}
    if len(kinds) != 1 or "?" in kinds:
        raise ValueError(metric)
    return kinds.pop()


def metric_kinds(metric: str) -> set[str]:
    """Every recipe kind that can produce the metric: `metric_kind`'s, and 'semi' for the classification
    metrics of a semi-supervised run's test evaluations (`SEMI_METRIC`); s_iter is every training kind's."""
    if metric == "s_iter":
        return {"at", "kd", "clip-kd", "semi", "seg-kd"}
    kind = metric_kind(metric)
    return {kind, "semi"} if all(SEMI_METRIC.match(m) for m in metric_parts(metric)) else {kind}


class _Reader:
    """Typed access to one table file's mapping, with errors that name the file and key."""

    def __init__(self, path: Path):
        self.path = path

    def fail(self, key: str, message: str) -> GKLError:
        return GKLError(f"{self.path}: {key}: {message}")

    def get(self, data: dict[str, Any], key: str, where: str, tp: type | tuple[type, ...], default: Any = ...) -> Any:
        if key not in data:
            if default is ...:
                raise self.fail(f"{where}{key}", "missing")
            return default
        value = data[key]
        if not isinstance(value, tp) or isinstance(value, bool) and tp is not bool:
            raise self.fail(f"{where}{key}", f"expected {getattr(tp, '__name__', tp)}, got {value!r}")
        return value

    def run(self, value: Any, key: str, extra: tuple[str, ...] = ()) -> RunSpec:
        if isinstance(value, str):
            return RunSpec(value, extra)
        if isinstance(value, dict) and set(value) <= {"recipe", "set"} and isinstance(value.get("recipe"), str):
            sets = value.get("set", [])
            if not (isinstance(sets, list) and all(isinstance(s, str) for s in sets)):
                raise self.fail(f"{key}.set", f"expected a list of KEY=VALUE strings, got {sets!r}")
            return RunSpec(value["recipe"], extra + tuple(sets))
        raise self.fail(key, f"expected a recipe name or {{recipe, set}}, got {value!r}")

    def metric(self, value: Any, key: str) -> str:
        try:
            metric_kind(value)
        except (ValueError, TypeError):
            hint = "; `@best` applies to top1, top5, many, medium, few" if isinstance(value, str) and "@" in value and \
                not value.startswith("aa@") else ""
            raise self.fail(key, f"unknown metric {value!r} (see `gklcli.tables` for the list{hint})") from None
        return value


_ROW_KEYS = {"labels", "paper", "recipe", "set", "runs", "metric", "metrics", "cited", "note", "section", "suffix"}
_TABLE_KEYS = {"name", "paper", "title", "columns", "metrics", "metric", "column_recipes", "rows", "status", "reason",
               "includes", "figures"}


def _metric_columns(r: _Reader, data: dict[str, Any], columns: list[str]) -> list[str]:
    """The numeric columns that a table-level `metric:` fills: those of `column_recipes`, else the last
    columns, as many as the first row has `paper` numbers (text columns come first)."""
    stems = r.get(data, "column_recipes", "", dict, {})
    if stems:
        return [c for c in columns if c in stems]
    rows = r.get(data, "rows", "", list, [])
    paper = rows[0].get("paper") if rows and isinstance(rows[0], dict) else None
    if not isinstance(paper, list) or not 0 < len(paper) <= len(columns):
        raise r.fail("metric", "a table-level metric needs column_recipes, or a first row whose `paper` list gives "
                     "the number of numeric columns")
    return columns[len(columns) - len(paper):]


def _column_metrics(r: _Reader, data: dict[str, Any], columns: list[str], where: str) -> dict[str, str]:
    """`metrics: {column: metric}` and/or `metric: m` (every numeric column) of a table or a row."""
    mapping = dict(r.get(data, "metrics", where, dict, {}))
    for column, metric in mapping.items():
        if column not in columns:
            raise r.fail(f"{where}metrics.{column}", f"not a column of the table ({', '.join(columns)})")
        r.metric(metric, f"{where}metrics.{column}")
    return mapping


def _parse_row(r: _Reader, data: Any, i: int, table: dict[str, Any]) -> Row:
    where = f"rows[{i}]."
    if not isinstance(data, dict):
        raise r.fail(where[:-1], f"expected a mapping, got {data!r}")
    unknown = sorted(set(data) - _ROW_KEYS)
    if unknown:
        raise r.fail(f"{where}{unknown[0]}", f"unknown key; allowed: {', '.join(sorted(_ROW_KEYS))}")
    text, numeric = table["text"], table["numeric"]
    labels = [str(v) for v in r.get(data, "labels", where, list)]
    if len(labels) != len(text):
        raise r.fail(f"{where}labels", f"expected {len(text)} values ({', '.join(text)}), got {len(labels)}")
    paper = r.get(data, "paper", where, list)
    if len(paper) != len(numeric) or not all(v is None or isinstance(v, (int, float)) and not isinstance(v, bool) for v in paper):
        raise r.fail(f"{where}paper", f"expected {len(numeric)} numbers or nulls ({', '.join(numeric)}), got {paper!r}")
    cited = r.get(data, "cited", where, bool, False)
    metrics = dict(table["metrics"])
    if "metric" in data:
        metrics = {c: r.metric(data["metric"], f"{where}metric") for c in numeric}
    metrics.update(_column_metrics(r, data, numeric, where))
    runs = _row_runs(r, data, where, table, cited)
    cells = [Cell(c, None if v is None else float(v), metrics.get(c), runs.get(c)) for c, v in zip(numeric, paper)]
    for cell in cells:
        if cell.run is not None and cell.metric is None:
            raise r.fail(f"{where}metrics", f"no metric for column {cell.column!r}")
    return Row(i + 1, dict(zip(text, labels)), cells, cited, r.get(data, "note", where, str, ""), r.get(data, "section", where, str, None))


def _row_runs(r: _Reader, data: dict[str, Any], where: str, table: dict[str, Any], cited: bool) -> dict[str, RunSpec]:
    numeric = table["numeric"]
    sets = tuple(r.get(data, "set", where, list, []))
    runs: dict[str, RunSpec] = {}
    if "recipe" in data:
        spec = r.run(r.get(data, "recipe", where, str), f"{where}recipe", sets)
        runs = {c: spec for c in numeric}
    if "suffix" in data:
        stems = table["column_recipes"]
        suffix = r.get(data, "suffix", where, str)
        runs = {c: RunSpec(stems[c] + suffix, sets) for c in numeric if c in stems}
    for column, value in r.get(data, "runs", where, dict, {}).items():
        if column not in numeric:
            raise r.fail(f"{where}runs.{column}", f"not a numeric column ({', '.join(numeric)})")
        runs[column] = r.run(value, f"{where}runs.{column}", sets)
    if cited and runs:
        raise r.fail(where[:-1], "a cited row has no runs (drop `cited` or the recipe)")
    return runs


def parse_table(path: Path) -> Table:
    """Read and check one table file (its recipes are checked by `validate_table`)."""
    r = _Reader(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise GKLError(f"{path}: cannot read: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise GKLError(f"{path}: invalid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise GKLError(f"{path}: a table file must be a YAML mapping")
    unknown = sorted(set(data) - _TABLE_KEYS)
    if unknown:
        raise r.fail(unknown[0], f"unknown key; allowed: {', '.join(sorted(_TABLE_KEYS))}")
    name = r.get(data, "name", "", str)
    if name != path.stem:
        raise r.fail("name", f"must match the file name {path.stem!r}, got {name!r}")
    includes = [str(v) for v in r.get(data, "includes", "", list, [])]
    columns = [str(c) for c in r.get(data, "columns", "", list, [])]
    metrics = _column_metrics(r, data, columns, "")
    if "metric" in data:
        metric = r.metric(data["metric"], "metric")
        metrics = {c: metric for c in _metric_columns(r, data, columns)} | metrics
    numeric = [c for c in columns if c in metrics]
    stems = r.get(data, "column_recipes", "", dict, {})
    ctx = {"text": [c for c in columns if c not in metrics], "numeric": numeric, "metrics": metrics, "column_recipes": stems}
    rows = [_parse_row(r, row, i, ctx) for i, row in enumerate(r.get(data, "rows", "", list, []))]
    if not includes and (not columns or not rows):
        raise r.fail("rows", "a table needs columns and rows (or `includes:` other tables)")
    status = r.get(data, "status", "", str, "runnable")
    if status not in ("runnable", "unsupported"):
        raise r.fail("status", f"must be 'runnable' or 'unsupported', got {status!r}")
    reason = r.get(data, "reason", "", str, "")
    if status == "unsupported" and (not reason or any(row.runnable for row in rows)):
        raise r.fail("reason", "an unsupported table needs a one-line reason and only cited rows")
    paper = r.get(data, "paper", "", str)
    if paper not in ("gkl", "ikl"):
        raise r.fail("paper", f"must be 'gkl' or 'ikl', got {paper!r}")
    figures = []
    for i, fig in enumerate(r.get(data, "figures", "", list, [])):
        if not isinstance(fig, dict) or fig.get("kind") not in ("margins", "scores", "tsne") or fig.get("column") not in numeric:
            raise r.fail(f"figures[{i}]", "expected {kind: margins|scores|tsne, rows: [...], column: COLUMN, caption: ...}")
        figures.append(Figure(fig["kind"], [str(x) for x in fig.get("rows", [])], fig["column"], str(fig.get("caption", ""))))
    return Table(name, paper, r.get(data, "title", "", str), columns, numeric, rows, path, status, reason, includes, figures)


def table_names() -> list[str]:
    """All registry tables: the GKL paper's in order, then the conference paper's."""
    names = [p.stem for p in TABLES_DIR.glob("*.yaml")]

    def order(name: str) -> tuple[int, int]:
        digits = re.findall(r"\d+", name)
        return (1 if name.startswith("ikl-") else 0, int(digits[-1]) if digits else 0)

    return sorted(names, key=order)


def load_table(name: str) -> Table:
    """A registry table by name (`table3`, `ikl-table6`) or a table file's path."""
    path = Path(name)
    if not path.is_file():
        path = TABLES_DIR / f"{name}.yaml"
    if not path.is_file():
        raise GKLError(f"unknown table {name!r}; `gkl reproduce --list` shows them ({', '.join(table_names()[:4])} …)")
    return parse_table(path)


def expand(table: Table) -> list[Table]:
    """The table itself, or the tables it `includes` (TABLE IX is its sub-tables X–XII)."""
    if not table.includes:
        return [table]
    return [t for name in table.includes for t in expand(load_table(name))]


def select_rows(table: Table, spec: Optional[str]) -> list[Row]:
    """`--rows 5,7` (row numbers) or `--rows GKL-AT` (text in the row's labels); None: all rows."""
    if not spec:
        return table.rows
    chosen: list[Row] = []
    for token in (t.strip() for t in spec.split(",") if t.strip()):
        if token.isdigit():
            hits = [row for row in table.rows if row.index == int(token)]
        else:
            hits = [row for row in table.rows if token.lower() in row.label.lower()]
        if not hits:
            raise GKLError(f"--rows {spec}: {token!r} matches no row of {table.name} (rows 1–{len(table.rows)})")
        chosen += [row for row in hits if row not in chosen]
    return sorted(chosen, key=lambda row: row.index)


def validate_table(table: Table) -> None:
    """Every run of the table resolves to a valid recipe of the kind its metric needs."""
    from gklcli.recipes import load_recipe, resolve_recipe_path

    for row in table.rows:
        for cell in row.cells:
            if cell.run is None:
                continue
            where = f"{table.path}: row {row.index} ({row.label}), column {cell.column!r}"
            try:
                recipe = load_recipe(resolve_recipe_path(cell.run.recipe), list(cell.run.overrides))
            except GKLError as err:
                raise GKLError(f"{where}: {err}") from None
            kinds = metric_kinds(cell.metric or "")
            if recipe.kind not in kinds:
                needed = " or ".join(f"kind-{k}" for k in sorted(kinds))
                raise GKLError(f"{where}: metric {cell.metric!r} needs a {needed} recipe, {cell.run.recipe} is kind {recipe.kind}")
            if is_best_metric(cell.metric or "") and not recipe.eval.test_every_epochs:
                raise GKLError(f"{where}: metric {cell.metric!r} needs the test set evaluated every epoch, but "
                               f"{cell.run.recipe} has eval.test_every_epochs 0 (set it in the recipe or the row's `set:`)")
