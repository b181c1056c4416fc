"""Filter expressions on index columns, parsed safely into pyarrow dataset expressions.

Grammar (a subset of Python expressions, parsed with ``ast``; nothing is evaluated):
``aesthetic >= 5 and kind == 'video'``, ``kind in ('image', 'image_edit')``,
``not (ocr_area > 0.1)``, ``recaption is not None``, ``0.001 < motion <= 0.05``.
Column names are checked against the index schema so a typo is an error naming the columns.
"""

from __future__ import annotations

import ast
import operator
from collections.abc import Iterable

import pyarrow.dataset as ds

_CMP = {
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
}


class FilterError(ValueError):
    pass


def parse_filter(text: str, columns: Iterable[str]) -> ds.Expression:
    """``text`` -> pyarrow expression; raises FilterError naming the problem."""
    columns = set(columns)
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as e:
        raise FilterError(f"filter {text!r} is not a valid expression: {e.msg}") from None
    return _Builder(text, columns).build(tree.body)


class _Builder:
    def __init__(self, text: str, columns: set[str]):
        self.text = text
        self.columns = columns

    def fail(self, what: str) -> FilterError:
        return FilterError(f"filter {self.text!r}: {what}")

    def build(self, node: ast.AST) -> ds.Expression:
        if isinstance(node, ast.BoolOp):
            parts = [self.build(v) for v in node.values]
            out = parts[0]
            for p in parts[1:]:
                out = (out & p) if isinstance(node.op, ast.And) else (out | p)
            return out
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            return ~self.build(node.operand)
        if isinstance(node, ast.Compare):
            return self.compare(node)
        if isinstance(node, ast.Name):  # bare boolean column
            return self.field(node)
        raise self.fail(f"unsupported syntax {ast.dump(node)[:60]!r}")

    def compare(self, node: ast.Compare) -> ds.Expression:
        out = None
        left = node.left
        for op, right in zip(node.ops, node.comparators, strict=True):
            out_i = self.one(left, op, right)
            out = out_i if out is None else (out & out_i)
            left = right
        return out

    def one(self, left: ast.AST, op: ast.cmpop, right: ast.AST) -> ds.Expression:
        if isinstance(op, (ast.Is, ast.IsNot)):
            if not (isinstance(right, ast.Constant) and right.value is None):
                raise self.fail("'is' only compares with None")
            f = self.field(left)
            return f.is_null() if isinstance(op, ast.Is) else f.is_valid()
        if isinstance(op, (ast.In, ast.NotIn)):
            values = self.literal(right)
            if not isinstance(values, (list, tuple, set)):
                raise self.fail("'in' needs a list or tuple of values")
            expr = self.field(left).isin(list(values))
            return ~expr if isinstance(op, ast.NotIn) else expr
        fn = _CMP.get(type(op))
        if fn is None:
            raise self.fail(f"unsupported operator {type(op).__name__}")
        if isinstance(left, ast.Name):
            return fn(self.field(left), self.literal(right))
        if isinstance(right, ast.Name):  # 5 < aesthetic
            return fn(ds.scalar(self.literal(left)), self.field(right))
        raise self.fail("a comparison needs a column on one side")

    def field(self, node: ast.AST) -> ds.Expression:
        if not isinstance(node, ast.Name):
            raise self.fail("expected a column name")
        if node.id not in self.columns:
            raise self.fail(
                f"unknown column {node.id!r}; columns: {', '.join(sorted(self.columns))}"
            )
        return ds.field(node.id)

    def literal(self, node: ast.AST):
        try:
            return ast.literal_eval(node)
        except ValueError:
            raise self.fail(f"expected a literal value, got {ast.unparse(node)!r}") from None
