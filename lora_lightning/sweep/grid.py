"""A sweep's finished cells arranged as the paper lays out its results: rows n Unknown facts,
columns the mix (every axis that is neither n nor a seed), each entry the cells of all seeds."""

from __future__ import annotations

from typing import Any

__all__ = ["Grid"]


class Grid:
    """The done cells arranged as the paper's tables: rows n, columns the group (mix), each
    entry the cells of all seeds."""

    def __init__(self, rows: list[dict[str, Any]], axes: list[str], roles: dict[str, str]):
        self.rows = rows
        self.group_axes = [a for a in axes if roles[a] == "group"]
        self.seed_axes = [a for a in axes if roles[a] == "seed"]
        self.ns = sorted({r["n_unknown"] for r in rows if r["n_unknown"] is not None})
        self.groups = list(dict.fromkeys(self.group(r) for r in rows))

    def group(self, row: dict[str, Any]) -> str:
        return " / ".join(str(row.get(a)) for a in self.group_axes) or "all"

    def cells(self, n: Any, group: str) -> list[dict[str, Any]]:
        return [r for r in self.rows if r["n_unknown"] == n and self.group(r) == group]

    def values(self, n: Any, group: str, column: str) -> list[float]:
        return [r[column] for r in self.cells(n, group)
                if r["state"] == "done" and isinstance(r.get(column), (int, float))]

    def stats(self, n: Any, group: str, column: str) -> tuple[float, float, float, int] | None:
        """Mean, min, max and count over the seeds (None when no cell has the measure)."""
        values = self.values(n, group, column)
        if not values:
            return None
        return sum(values) / len(values), min(values), max(values), len(values)

    def has(self, column: str) -> bool:
        return any(r["state"] == "done" and r.get(column) is not None for r in self.rows)
