"""Filter expressions on index columns, parsed safely into pyarrow dataset expressions.

Grammar (a subset of Python expressions, parsed with ``ast``; nothing is evaluated):
``aesthetic >= 5 and kind == 'video'``, ``kind in ('image', 'image_edit')``,
``not (ocr_area > 0.1)``, ``recaption is not None``, ``0.001 < motion <= 0.05``.
Column names are checked against the index schema so a typo is an error naming the columns.

Size and nesting are limited (``MAX_FILTER_*``) before anything recursive runs: ``ast.parse``,
the builder and pyarrow all recurse once per nesting level, and a hostile or generated filter
(5000 ``not``s, a 9000-term ``and`` chain) otherwise ends in RecursionError, MemoryError or a
segfault inside pyarrow instead of a FilterError.
"""

from __future__ import annotations

import ast
import io
import operator
import tokenize
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


# A real filter has at most a few dozen terms and a handful of nesting levels; these limits
# leave ample room while keeping every recursive step far from Python's and pyarrow's limits
# (ast.parse gives up near 3000 levels, fewer when called from deep in a stack; pyarrow
# crashed on a 9000-term chain).
MAX_FILTER_CHARS = 20_000  # also room for an `in (...)` list of a few hundred sample keys
MAX_FILTER_OPERATORS = 1_000  # operators and opening brackets: each can nest one level deeper
MAX_FILTER_TERMS = 256  # comparisons (`a < b < c` is two) and bare boolean columns
MAX_FILTER_DEPTH = 32  # levels of the parsed expression tree

# Operator tokens that add no level (a comparison chain is one node, `,` a flat tuple; closing
# brackets were counted when opened), and the keywords that add one (`and`/`or` build one
# flat node per chain, so they are not counted).
_FLAT_OPS = {",", ")", "]", "}", "==", "!=", "<", "<=", ">", ">="}
_NESTING_WORDS = {"not", "if", "lambda", "await"}


class FilterError(ValueError):
    pass


def parse_filter(text: str, columns: Iterable[str]) -> ds.Expression:
    """``text`` -> pyarrow expression; raises FilterError naming the problem."""
    columns = set(columns)
    text = text.strip()
    _check_text(text)
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as e:
        raise FilterError(f"filter {_short(text)} is not a valid expression: {e.msg}") from None
    except (RecursionError, MemoryError):  # the parser's stack overflow; _check_text should
        # have caught it, but nesting hidden where tokens are not counted (f-strings) remains
        raise FilterError(f"filter {_short(text)} nests too deeply to parse") from None
    _check_tree(text, tree)
    return _Builder(text, columns).build(tree.body)


def _short(text: str) -> str:
    """The filter as error messages quote it: repr (one line), long ones cut."""
    return repr(text if len(text) <= 80 else text[:77] + "...")


def _check_text(text: str) -> None:
    """Length and operator count, on the tokens (linear, no recursion), before ast.parse."""
    if len(text) > MAX_FILTER_CHARS:
        raise FilterError(
            f"filter {_short(text)} is {len(text)} characters long; at most {MAX_FILTER_CHARS}"
        )
    nesting = 0
    try:
        for tok in tokenize.generate_tokens(io.StringIO(text).readline):
            if (tok.type == tokenize.OP and tok.string not in _FLAT_OPS) or (
                tok.type == tokenize.NAME and tok.string in _NESTING_WORDS
            ):
                nesting += 1
    except (tokenize.TokenError, SyntaxError):
        pass  # unbalanced brackets and the like: ast.parse names the error
    if nesting > MAX_FILTER_OPERATORS:
        raise FilterError(
            f"filter {_short(text)} has {nesting} operators and brackets; "
            f"at most {MAX_FILTER_OPERATORS}"
        )


def _check_tree(text: str, tree: ast.Expression) -> None:
    """Number of terms and nesting depth of the parsed filter (iterative walk)."""
    terms, deepest = 0, 0
    stack: list[tuple[ast.AST, int, bool]] = [(tree.body, 1, True)]
    while stack:
        node, depth, boolean = stack.pop()
        deepest = max(deepest, depth)
        if deepest > MAX_FILTER_DEPTH:
            raise FilterError(f"filter {_short(text)} nests deeper than {MAX_FILTER_DEPTH} levels")
        if isinstance(node, ast.Compare):
            terms += len(node.ops)
        elif isinstance(node, ast.Name) and boolean:
            terms += 1
        # only operands of and/or/not are in boolean position (a bare column is a term)
        below = isinstance(node, ast.BoolOp) or (
            isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not)
        )
        stack.extend((child, depth + 1, below) for child in ast.iter_child_nodes(node))
    if terms > MAX_FILTER_TERMS:
        raise FilterError(f"filter {_short(text)} has {terms} terms; at most {MAX_FILTER_TERMS}")


class _Builder:
    def __init__(self, text: str, columns: set[str]):
        self.text = text
        self.columns = columns

    def fail(self, what: str) -> FilterError:
        return FilterError(f"filter {_short(self.text)}: {what}")

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
