"""Tidy the book's notebooks: test machinery out of the reader's sight, code within 88 columns.

    python scripts/tidy_notebooks.py book/*.ipynb          # rewrite the notebooks in place
    python scripts/tidy_notebooks.py --check book/*.ipynb  # exit 1 listing what would change
                                                           # or what needs a hand fix

On every notebook, and idempotently (a second run changes nothing):

1. nbval's comment markers (``# NBVAL_IGNORE_OUTPUT``, ``# NBVAL_SKIP``, ``# NBVAL_CHECK_OUTPUT``,
   ``# NBVAL_RAISES_EXCEPTION``) become the cell tags nbval honours (``nbval-ignore-output``,
   ...), and the comment line goes.
2. Checks of committed values leave the reader's cell: the statements that build ``COMMITTED*``
   dictionaries, call ``assert_committed(...)`` or ``assert``, the assignments and imports that
   only they use, and the comment lines directly above them, move (``ast`` line ranges) into a
   new code cell right after, tagged ``remove-cell``: Jupyter Book hides it, nbval and
   ``make book`` still execute it. A cell that is all checks is tagged instead of split. Checks
   are recognised by name (``assert_committed``, ``COMMITTED``), never by import path. Inside a
   top-level ``if``/``else`` the checks move into the same ``if``/``else`` in the new cell (its
   condition must be free of calls and of names the cell rebinds). A statement moves only when
   the statements it passes read and bind none of the names it binds, and bind none it reads,
   so the namespace after the two cells is the one after the original cell; the cell's last
   expression (its displayed result) and its outputs stay where they were.
3. Code cells are formatted by ``ruff format`` with ``book/ruff.toml`` (``line-length = 88``);
   lines still longer are fixed where that is mechanical (a comment moved above its code or
   wrapped, a string literal that starts a line inside brackets split by implicit
   concatenation), and the rest are listed for a hand fix (a line with a URL in it, which
   cannot be broken, is allowed).

Outputs, execution counts and cell ids of existing cells never change: the script checks that
before it writes, and refuses otherwise.
"""

from __future__ import annotations

import argparse
import ast
import io
import json
import re
import shutil
import subprocess
import sys
import textwrap
import tokenize
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MAX_LINE = 88
#: nbval's comment markers and the cell tags it reads instead (nbval/plugin.py: metadata_tags).
MARKERS = {
    "NBVAL_IGNORE_OUTPUT": "nbval-ignore-output",
    "NBVAL_SKIP": "nbval-skip",
    "NBVAL_CHECK_OUTPUT": "nbval-check-output",
    "NBVAL_RAISES_EXCEPTION": "nbval-raises-exception",
}
HIDDEN_TAG = "remove-cell"
#: a call of fewclip_tutorial.report.glue / glue_paired (myst-nb's glue): its output holds
#: the glued value, a trained number whose last digits depend on the CPU
GLUE_CALL = re.compile(r"\bglue(_paired)?\(")
CHECK_FUNCTIONS = {"assert_committed", "expect"}
COMMITTED_PREFIX = "COMMITTED"
#: Methods that change their receiver in place (a moved check must not pass one of them).
MUTATORS = {
    "append", "extend", "insert", "pop", "popitem", "remove", "clear", "update", "setdefault",
    "add", "discard", "sort", "reverse", "fill_", "zero_", "copy_", "add_", "mul_", "set",
}  # fmt: skip
#: Calls that return None: a cell whose last statement becomes one of these displays nothing.
NONE_CALLS = {"print", "display", "show", "tight_layout", "savefig", "close"}


def marker_of(line: str) -> str | None:
    """The nbval marker a source line is (as nbval's find_comment_markers reads it), or None."""
    stripped = line.strip()
    if not stripped.startswith("#"):
        return None
    comment = stripped.lstrip("#").strip()
    return comment if comment in MARKERS else None


# ----------------------------------------------------------------------------- notebook I/O


def source_of(cell: dict) -> str:
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else src


def set_source(cell: dict, text: str) -> None:
    cell["source"] = text.splitlines(keepends=True)


def dumps(nb: dict) -> str:
    """The layout nbformat and Jupyter write: indent 1, sorted keys, a final newline."""
    return json.dumps(nb, indent=1, ensure_ascii=False, sort_keys=True) + "\n"


def tags_of(cell: dict) -> list[str]:
    return cell.get("metadata", {}).get("tags", [])


def add_tag(cell: dict, tag: str) -> bool:
    tags = cell.setdefault("metadata", {}).setdefault("tags", [])
    if tag in tags:
        return False
    tags.append(tag)
    return True


# ----------------------------------------------------------------------------- names


def _is_check_call(node: ast.AST) -> bool:
    if not isinstance(node, ast.Call):
        return False
    f = node.func
    name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None
    return name in CHECK_FUNCTIONS


def has_marker(node: ast.AST) -> bool:
    """Does the subtree hold a check: assert_committed(...), a COMMITTED* name, an assert?"""
    for n in ast.walk(node):
        if isinstance(n, ast.Assert) or _is_check_call(n):
            return True
        if isinstance(n, ast.Name) and n.id.startswith(COMMITTED_PREFIX):
            return True
        if isinstance(n, ast.alias) and (n.asname or n.name).split(".")[-1] in CHECK_FUNCTIONS:
            return True
    return False


def _walk_outside_comprehensions(node: ast.AST):
    """ast.walk, but the loop variables of comprehensions (their own scope) are not yielded."""
    stack = [node]
    while stack:
        n = stack.pop()
        yield n
        for child in ast.iter_child_nodes(n):
            if isinstance(child, ast.comprehension):
                stack.extend([child.iter, *child.ifs])  # the target is local to it
            else:
                stack.append(child)


def _base_name(node: ast.AST) -> str | None:
    while isinstance(node, ast.Attribute | ast.Subscript | ast.Starred):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


def names(stmt: ast.stmt) -> tuple[set[str], set[str]]:
    """(names the statement reads, names it binds or changes in place), conservatively."""
    read, bound = set(), set()
    if isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
        bound.add(stmt.name)
    for n in _walk_outside_comprehensions(stmt):
        if isinstance(n, ast.Name):
            (bound if isinstance(n.ctx, ast.Store | ast.Del) else read).add(n.id)
        elif isinstance(n, ast.Attribute | ast.Subscript) and isinstance(
            n.ctx, ast.Store | ast.Del
        ):
            base = _base_name(n)
            if base:
                bound.add(base)
                read.add(base)
        elif isinstance(n, ast.alias):
            bound.add((n.asname or n.name).split(".")[0])
        elif isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute):
            inplace = any(k.arg == "inplace" for k in n.keywords)
            if n.func.attr in MUTATORS or inplace:
                base = _base_name(n.func.value)
                if base:
                    bound.add(base)
        elif isinstance(n, ast.Global | ast.Nonlocal):
            bound.update(n.names)
    return read, bound


# ----------------------------------------------------------------------------- planning a split


class Unresolved(Exception):
    """A check that cannot move safely; the cell is left as it is and the reason reported."""


@dataclass
class Plan:
    """Which top-level statements move, and which parts of a top-level if/else move."""

    moved: set[int] = field(default_factory=set)  # indices into the body
    #: body index -> (moved indices of the if-branch, moved indices of the else-branch)
    nested: dict[int, tuple[set[int], set[int]]] = field(default_factory=dict)


def _is_pure_check(stmt: ast.stmt) -> bool:
    """A compound statement made only of checks and the assignments they need."""
    for n in ast.walk(stmt):
        if isinstance(n, ast.Expr) and not _is_check_call(n.value):
            return False
        if isinstance(n, ast.Return | ast.Yield | ast.YieldFrom | ast.Global | ast.Nonlocal):
            return False
        if isinstance(n, ast.With | ast.AsyncWith | ast.Try | ast.ClassDef):
            return False
    return True


def _split_import(stmt: ast.stmt) -> tuple[list[ast.alias], list[ast.alias]] | None:
    """(check aliases, other aliases) of an import that names a check function, else None."""
    if not isinstance(stmt, ast.Import | ast.ImportFrom):
        return None
    checks = [a for a in stmt.names if (a.asname or a.name).split(".")[-1] in CHECK_FUNCTIONS]
    if not checks:
        return None
    return checks, [a for a in stmt.names if a not in checks]


def classify(stmt: ast.stmt) -> str:
    """'check' (moves whole), 'split-import', 'nested-if', 'unresolved' or 'plain'."""
    split = _split_import(stmt)
    if split is not None:
        return "check" if not split[1] else "split-import"
    if not has_marker(stmt):
        return "plain"
    if isinstance(stmt, ast.Expr) and not _is_check_call(stmt.value):
        return "unresolved"  # e.g. print(COMMITTED): its output would move with it
    if isinstance(stmt, ast.Assert | ast.Expr | ast.Assign | ast.AnnAssign | ast.AugAssign):
        return "check"
    if isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef):
        return "check"  # defining a checking function has no effect of its own
    if _is_pure_check(stmt):
        return "check"
    if isinstance(stmt, ast.If) and not (
        len(stmt.orelse) == 1 and isinstance(stmt.orelse[0], ast.If)
    ):
        return "nested-if"
    return "unresolved"


def _choose(body: list[ast.stmt], after: list[ast.stmt], keep_last: bool) -> set[int]:
    """Indices of ``body`` that move: the checks, then the statements only they use.

    ``after``: statements that run after ``body`` and stay (an enclosing list's remainder).
    """
    kinds = [classify(s) for s in body]
    for s, k in zip(body, kinds, strict=True):
        if k in ("unresolved", "nested-if", "split-import"):
            raise Unresolved(f"line {s.lineno}: a check inside a statement that cannot be split")
    moved = {i for i, k in enumerate(kinds) if k == "check"}
    if keep_last and body and isinstance(body[-1], ast.Expr) and not _is_check_call(body[-1].value):
        moved.discard(len(body) - 1)
    rw = [names(s) for s in body]
    after_rw = [names(s) for s in after]
    # helpers: assignments, imports and defs whose names only moved statements read
    helpers = (
        ast.Assign,
        ast.AnnAssign,
        ast.AugAssign,
        ast.Import,
        ast.ImportFrom,
        ast.FunctionDef,
    )
    changed = True
    while changed:
        changed = False
        for i in range(len(body) - 1, -1, -1):
            if i in moved or not isinstance(body[i], helpers):
                continue
            bound = rw[i][1]
            later = range(i + 1, len(body))
            used_by_moved = any(bound & rw[j][0] for j in later if j in moved)
            used_by_kept = any(bound & (rw[j][0] | rw[j][1]) for j in later if j not in moved)
            used_after = any(bound & (r | b) for r, b in after_rw)
            if used_by_moved and not used_by_kept and not used_after:
                moved.add(i)
                changed = True
    for i in sorted(moved):
        read, bound = rw[i]
        for j in range(i + 1, len(body)):
            if j in moved:
                continue
            r, b = rw[j]
            if bound & (r | b) or read & b:
                raise Unresolved(
                    f"line {body[i].lineno}: the check shares names with line {body[j].lineno} "
                    f"({sorted((bound & (r | b)) | (read & b))}), which stays"
                )
        for r, b in after_rw:
            if bound & (r | b) or read & b:
                raise Unresolved(f"line {body[i].lineno}: the check shares names with later code")
    return moved


def plan_cell(tree: ast.Module) -> Plan:
    body = tree.body
    plan = Plan()
    for i, stmt in enumerate(body):
        kind = classify(stmt)
        if kind == "split-import":
            plan.moved.add(i)  # handled by the text rewrite: the check names move, the rest stays
        elif kind == "nested-if":
            test_read, _ = names(ast.Module(body=[ast.Expr(stmt.test)], type_ignores=[]))
            if any(isinstance(n, ast.Call) for n in ast.walk(stmt.test)):
                raise Unresolved(f"line {stmt.lineno}: the if's condition calls a function")
            for other in body[i:]:
                if test_read & names(other)[1]:
                    raise Unresolved(f"line {stmt.lineno}: the cell rebinds the if's condition")
            rest = body[i + 1 :]
            plan.nested[i] = (
                _choose(stmt.body, rest, keep_last=False),
                _choose(stmt.orelse, rest, keep_last=False),
            )
    chosen = _choose_top(body, plan)
    plan.moved |= chosen
    return plan


def _choose_top(body: list[ast.stmt], plan: Plan) -> set[int]:
    """_choose over the top level, where nested ifs and split imports stay (their rest does)."""
    stand_in = []
    for i, s in enumerate(body):
        kind = classify(s)
        if kind == "split-import":
            checks, others = _split_import(s)
            stand_in.append(_with_names(s, others))
        elif kind == "nested-if":
            stand_in.append(_without(s, *plan.nested[i]))
        else:
            stand_in.append(s)
    moved = _choose(stand_in, [], keep_last=True)
    # the moved parts of split imports and nested ifs must not clash with what stays after them
    for i, s in enumerate(body):
        kind = classify(s)
        if kind not in ("split-import", "nested-if"):
            continue
        part = _with_names(s, _split_import(s)[0]) if kind == "split-import" else s
        read, bound = names(part)
        if kind == "nested-if":
            read, bound = set(), set()
            for sub, idx in ((s.body, plan.nested[i][0]), (s.orelse, plan.nested[i][1])):
                for j in idx:
                    r, b = names(sub[j])
                    read |= r
                    bound |= b
        for j in range(i + 1, len(body)):
            if j in moved:
                continue
            r, b = names(stand_in[j])
            if bound & (r | b) or read & b:
                raise Unresolved(
                    f"line {s.lineno}: its check shares names with line {body[j].lineno}"
                )
    return moved


def _with_names(stmt: ast.stmt, aliases: list[ast.alias]) -> ast.stmt:
    new = (
        ast.ImportFrom(stmt.module, aliases, stmt.level)
        if isinstance(stmt, ast.ImportFrom)
        else ast.Import(aliases)
    )
    return ast.copy_location(new, stmt)


def _without(stmt: ast.If, body_moved: set[int], else_moved: set[int]) -> ast.If:
    body = [s for j, s in enumerate(stmt.body) if j not in body_moved] or [ast.Pass()]
    orelse = [s for j, s in enumerate(stmt.orelse) if j not in else_moved]
    return ast.copy_location(ast.If(stmt.test, body, orelse), stmt)


# ----------------------------------------------------------------------------- rewriting text


def _span(stmt: ast.stmt) -> tuple[int, int]:
    """1-based first and last line of a statement, decorators included."""
    first = min([stmt.lineno] + [d.lineno for d in getattr(stmt, "decorator_list", [])])
    return first, stmt.end_lineno


def _with_comments(lines: list[str], first: int, taken: set[int]) -> int:
    """Extend a statement's first line upwards over the comment lines directly above it."""
    while first > 1 and (first - 1) not in taken and lines[first - 2].strip().startswith("#"):
        if marker_of(lines[first - 2]):
            break
        first -= 1
    return first


def split_source(src: str) -> tuple[str, str] | None:
    """(what stays, the check cell's source), or None when the cell holds no check."""
    tree = ast.parse(src)
    if not any(has_marker(s) or _split_import(s) for s in tree.body):
        return None
    plan = plan_cell(tree)
    if not plan.moved and not any(a or b for a, b in plan.nested.values()):
        return None
    lines = src.splitlines()
    spans = [_span(s) for s in tree.body]
    # one statement per line range: a moved statement must not share a line with a kept one
    line_owner: dict[int, int] = {}
    for i, (a, b) in enumerate(spans):
        for ln in range(a, b + 1):
            if ln in line_owner:
                raise Unresolved(f"line {ln} holds two statements")
            line_owner[ln] = i
    drop: set[int] = set()  # line numbers removed from the reader's cell
    replace: dict[int, list[str]] = {}  # first line -> replacement lines
    check_parts: list[str] = []
    for i, stmt in enumerate(tree.body):
        a, b = spans[i]
        if i in plan.moved and _split_import(stmt) and _split_import(stmt)[1]:
            checks, others = _split_import(stmt)
            for ln in range(a, b + 1):
                drop.add(ln)
            replace[a] = [ast.unparse(_with_names(stmt, others))]
            check_parts.append(ast.unparse(_with_names(stmt, checks)))
        elif i in plan.moved:
            first = _with_comments(lines, a, set(line_owner))
            check_parts.append("\n".join(lines[first - 1 : b]))
            drop.update(range(first, b + 1))
        elif i in plan.nested:
            body_moved, else_moved = plan.nested[i]
            parts = []
            for branch, idx in ((stmt.body, body_moved), (stmt.orelse, else_moved)):
                taken: list[str] = []
                for j in sorted(idx):
                    sa, sb = _span(branch[j])
                    first = _with_comments(lines, sa, set(line_owner) - set(range(a, b + 1)))
                    taken.append(textwrap.dedent("\n".join(lines[first - 1 : sb])))
                    drop.update(range(first, sb + 1))
                    if len(idx) == len(branch):  # the branch would be empty: leave a pass
                        indent = re.match(r"\s*", lines[sa - 1]).group()
                        replace.setdefault(first, [indent + "pass"])
                parts.append(taken)
            test = ast.get_source_segment(src, stmt.test)
            body_part, else_part = parts
            if body_part and else_part:
                check_parts.append(
                    f"if {test}:\n"
                    + textwrap.indent("\n".join(body_part), "    ")
                    + "\nelse:\n"
                    + textwrap.indent("\n".join(else_part), "    ")
                )
            elif body_part:
                check_parts.append(f"if {test}:\n" + textwrap.indent("\n".join(body_part), "    "))
            elif else_part:
                neg = stmt.test
                cond = (
                    ast.get_source_segment(src, neg.operand)
                    if isinstance(neg, ast.UnaryOp) and isinstance(neg.op, ast.Not)
                    else f"not ({test})"
                )
                check_parts.append(f"if {cond}:\n" + textwrap.indent("\n".join(else_part), "    "))
    kept: list[str] = []
    for ln, line in enumerate(lines, start=1):
        if ln in replace:
            kept.extend(replace[ln])
        if ln not in drop:
            kept.append(line)
    kept_src = "\n".join(kept).strip("\n")
    _check_display(tree, kept_src)
    return kept_src, "\n".join(p.strip("\n") for p in check_parts)


def _check_display(original: ast.Module, kept_src: str) -> None:
    """The reader's cell must display what it displayed: its last expression is unchanged."""
    kept = ast.parse(kept_src)
    if not kept.body:
        return
    last_old, last_new = original.body[-1], kept.body[-1]
    if ast.dump(last_old) == ast.dump(last_new) or not isinstance(last_new, ast.Expr):
        return
    v = last_new.value
    if isinstance(v, ast.Call):
        f = v.func
        name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None
        if name in NONE_CALLS:
            return
    raise Unresolved("the cell's last expression would change (it would display something new)")


def _is_code_only_comments(src: str) -> bool:
    return all(not ln.strip() or ln.strip().startswith("#") for ln in src.splitlines())


# ----------------------------------------------------------------------------- long lines


def _comment_lines(text: str, indent: str) -> list[str]:
    """A comment's text wrapped at MAX_LINE, never between the sides of ``a = b``."""
    width = max(MAX_LINE - len(indent) - 2, 30)
    glued = re.sub(r" ([=<>]=?|[-+*/]) (?=\S)", "\x00\\1\x00", text)
    wrapped = textwrap.wrap(glued, width, break_long_words=False, break_on_hyphens=False)
    return [f"{indent}# {w}".replace("\x00", " ") for w in wrapped] or [f"{indent}#"]


def _tokens(src: str) -> list[tokenize.TokenInfo] | None:
    try:
        return list(tokenize.generate_tokens(io.StringIO(src + "\n").readline))
    except (tokenize.TokenError, SyntaxError, IndentationError):
        return None


def _plain_comment(text: str) -> bool:
    """A comment that may be rewrapped: no URL, no tool directive, no nbval marker."""
    return not (
        marker_of(text)
        or any(k in text for k in ("://", "noqa", "fmt:", "type:", "pragma"))
        or text.startswith("#!")
    )


def move_trailing_comments(src: str) -> str:
    """A trailing comment that takes its line over MAX_LINE goes above the line, wrapped.

    Run before ruff: ruff counts the comment in the line's length and would split the code.
    """
    lines = src.splitlines()
    tokens = _tokens(src) if any(len(ln) > MAX_LINE for ln in lines) else None
    if not tokens:
        return src
    edits: dict[int, list[str]] = {}
    for tok in tokens:
        row = tok.start[0] - 1
        if tok.type != tokenize.COMMENT or row >= len(lines) or len(lines[row]) <= MAX_LINE:
            continue
        line = lines[row]
        indent = re.match(r"\s*", line).group()
        code = line[: tok.start[1]].rstrip()
        if code.strip() and len(code) <= MAX_LINE and _plain_comment(tok.string):
            edits[row] = _comment_lines(tok.string.lstrip("#").strip(), indent) + [code]
    out: list[str] = []
    for i, line in enumerate(lines):
        out.extend(edits.get(i, [line]))
    return "\n".join(out)


def fix_long_lines(src: str) -> str:
    """Mechanical fixes for lines over MAX_LINE; what cannot be fixed so stays as it is.

    A block of comment lines with a long line is rewrapped; a string literal that starts a
    line inside brackets is split into implicitly concatenated pieces (at spaces, outside
    f-string fields; never a string with a URL in it).
    """
    lines = src.splitlines()
    if not any(len(ln) > MAX_LINE for ln in lines):
        return src
    tokens = _tokens(src)
    if not tokens:
        return src
    edits: dict[int, list[str]] = {}  # 0-based first line -> replacement lines
    skip: set[int] = set()  # further lines replaced by an edit
    depth_at_line: dict[int, int] = {}
    depth = 0
    own_line_comments: dict[int, str] = {}
    for tok in tokens:
        row = tok.start[0] - 1
        depth_at_line.setdefault(row, depth)
        if tok.type == tokenize.OP and tok.string in "([{":
            depth += 1
        elif tok.type == tokenize.OP and tok.string in ")]}":
            depth -= 1
        elif tok.type == tokenize.COMMENT and lines[row][: tok.start[1]].strip() == "":
            own_line_comments[row] = tok.string
    for tok in tokens:
        row = tok.start[0] - 1
        if row in edits or row in skip or row >= len(lines) or len(lines[row]) <= MAX_LINE:
            continue
        line = lines[row]
        indent = re.match(r"\s*", line).group()
        if tok.type == tokenize.COMMENT and row in own_line_comments:
            block = [row]

            def same(r: int, indent: str = indent) -> bool:
                return (
                    r in own_line_comments
                    and re.match(r"\s*", lines[r]).group() == indent
                    and _plain_comment(own_line_comments[r])
                )

            if not same(row):
                continue
            while same(block[-1] + 1):  # the lines it flows into; those above stay
                block.append(block[-1] + 1)
            if any(r in edits or r in skip for r in block):
                continue
            text = " ".join(own_line_comments[r].lstrip("#").strip() for r in block)
            edits[block[0]] = _comment_lines(text, indent)
            skip.update(block[1:])
        elif (
            tok.type == tokenize.STRING
            and tok.start[0] == tok.end[0]
            and tok.start[1] == len(indent)
            and depth_at_line.get(row, 0) > 0
            and "://" not in tok.string
        ):
            rest = line[tok.end[1] :]  # a comma, a bracket: on the last piece's line
            pieces = _split_string(tok.string, MAX_LINE - len(indent) - len(rest))
            if pieces:
                edits[row] = [indent + p for p in pieces[:-1]] + [indent + pieces[-1] + rest]
    if not edits:
        return src
    out: list[str] = []
    for i, line in enumerate(lines):
        if i in skip:
            continue
        out.extend(edits.get(i, [line]))
    return "\n".join(out)


def _split_string(literal: str, width: int) -> list[str] | None:
    """A one-line string literal as implicitly concatenated pieces of at most ``width``."""
    m = re.fullmatch(r"([A-Za-z]*)('|\")(.*)\2", literal, re.S)
    if not m or m.group(3).startswith(m.group(2) * 2):
        return None
    prefix, quote, body = m.groups()
    if "b" in prefix.lower() and "\\" in body:
        return None
    is_f = "f" in prefix.lower()
    # split points: after a space, outside f-string fields
    cut_ok = []
    level = 0
    i = 0
    while i < len(body):
        ch = body[i]
        if is_f and body.startswith("{{", i) and level == 0:
            i += 2
            continue
        if is_f and body.startswith("}}", i) and level == 0:
            i += 2
            continue
        if is_f and ch == "{":
            level += 1
        elif is_f and ch == "}":
            level -= 1
        elif ch == " " and level == 0 and (i == 0 or body[i - 1] != "\\"):
            cut_ok.append(i + 1)
        i += 1
    pieces = []
    start = 0
    overhead = len(prefix) + 2
    while overhead + len(body) - start > width:
        fits = [c for c in cut_ok if start < c <= start + width - overhead - 1]
        if not fits:
            break
        pieces.append(body[start : fits[-1]])
        start = fits[-1]
    if not pieces:
        return None
    pieces.append(body[start:])

    def lit(piece: str) -> str:
        p = prefix
        if is_f and "{" not in piece and "}" not in piece:
            p = p.replace("f", "").replace("F", "")
        return f"{p}{quote}{piece}{quote}"

    return [lit(p) for p in pieces]


# ----------------------------------------------------------------------------- ruff


def ruff_binary() -> str:
    try:
        from ruff.__main__ import find_ruff_bin

        return str(find_ruff_bin())
    except Exception:  # noqa: BLE001 - any failure: look on PATH and beside the interpreter
        here = Path(sys.executable).parent / "ruff"
        found = str(here) if here.exists() else shutil.which("ruff")
        if not found:
            raise SystemExit("ruff not found: pip install ruff") from None
        return found


def ruff_format(text: str, path: Path) -> str:
    """A notebook's JSON, formatted by ruff with the configuration found for ``path``."""
    proc = subprocess.run(
        [ruff_binary(), "format", "--stdin-filename", str(path), "-"],
        input=text,
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"ruff format failed on {path}: {proc.stderr.strip()}")
    return proc.stdout


# ----------------------------------------------------------------------------- one notebook


@dataclass
class Report:
    markers: int = 0
    split: int = 0
    hidden: int = 0
    reformatted: int = 0  # lines changed by the formatting steps
    long_lines: list[str] = field(default_factory=list)
    unresolved: list[str] = field(default_factory=list)


def _new_id(base: str, taken: set[str]) -> str:
    new = f"{base}-checks"[:64]
    n = 2
    while new in taken:
        new = f"{base}-checks{n}"[:64]
        n += 1
    taken.add(new)
    return new


def tidy(nb: dict, path: Path, report: Report) -> dict:
    """The tidied notebook (a new object; ``nb`` is not changed)."""
    nb = json.loads(json.dumps(nb))
    cells_out = []
    taken = {c.get("id") for c in nb["cells"] if c.get("id")}
    for index, cell in enumerate(nb["cells"]):
        cells_out.append(cell)
        if cell["cell_type"] != "code":
            continue
        src = source_of(cell)
        lines = src.splitlines()
        found = [(i, marker_of(ln)) for i, ln in enumerate(lines) if marker_of(ln)]
        if found:
            for _, m in found:
                add_tag(cell, MARKERS[m])
            drop = {i for i, _ in found}
            src = "\n".join(ln for i, ln in enumerate(lines) if i not in drop).strip("\n")
            set_source(cell, src)
            report.markers += len(found)
        if GLUE_CALL.search(src):  # glued values are trained numbers: checked by a hidden
            add_tag(cell, "nbval-ignore-output")  # assert_committed, not compared by nbval
        if HIDDEN_TAG in tags_of(cell):
            continue
        try:
            parts = split_source(src)
        except SyntaxError:
            if any(k in src for k in (*CHECK_FUNCTIONS, COMMITTED_PREFIX)):
                report.unresolved.append(f"{path}: cell {index}: does not parse, checks not moved")
            continue
        except Unresolved as exc:
            report.unresolved.append(f"{path}: cell {index} ({cell.get('id')}): {exc}")
            continue
        if parts is None:
            continue
        kept, checks = parts
        if _is_code_only_comments(kept):
            add_tag(cell, HIDDEN_TAG)
            report.hidden += 1
            continue
        set_source(cell, kept)
        check_cell = {
            "cell_type": "code",
            "execution_count": None,
            "id": _new_id(cell.get("id") or f"cell{index}", taken),
            "metadata": {"tags": [HIDDEN_TAG]},
            "outputs": [],
            "source": [],
        }
        if "nbval-ignore-output" in tags_of(cell):
            check_cell["metadata"]["tags"].append("nbval-ignore-output")
        set_source(check_cell, checks)
        cells_out.append(check_cell)
        report.split += 1
    nb["cells"] = cells_out
    return nb


def format_code(nb: dict, path: Path, report: Report) -> dict:
    """ruff format, the mechanical long-line fixes, ruff format again (until nothing moves)."""
    before = {c.get("id"): source_of(c) for c in nb["cells"] if c["cell_type"] == "code"}
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            src = source_of(cell)
            moved = move_trailing_comments(src)
            if moved != src:
                set_source(cell, moved)
    text = dumps(nb)
    for _ in range(4):
        text = ruff_format(text, path)
        new = json.loads(text)
        changed = False
        for cell in new["cells"]:
            if cell["cell_type"] != "code":
                continue
            src = source_of(cell)
            fixed = fix_long_lines(src)
            if fixed != src:
                set_source(cell, fixed)
                changed = True
        text = dumps(new)
        if not changed:
            break
    nb = json.loads(text)
    for cell in nb["cells"]:
        if cell["cell_type"] != "code":
            continue
        old = before.get(cell.get("id"), "").splitlines()
        new_lines = source_of(cell).splitlines()
        report.reformatted += len(set(new_lines) - set(old))
        for ln in new_lines:
            if len(ln) > MAX_LINE and "://" not in ln:  # a URL cannot be broken
                report.long_lines.append(f"{path}: cell {cell.get('id')}: {len(ln)}: {ln.strip()}")
    return nb


def outputs_problems(before: dict, after: dict) -> list[str]:
    """Every cell of ``before`` keeps its id, outputs and execution count; new cells have none."""
    problems = []
    old = {c.get("id"): c for c in before["cells"]}
    ids = [c.get("id") for c in after["cells"]]
    if len(set(ids)) != len(ids):
        problems.append("duplicate cell ids")
    for cid, c in old.items():
        match = [d for d in after["cells"] if d.get("id") == cid]
        if not match:
            problems.append(f"cell {cid} is gone")
            continue
        d = match[0]
        if c["cell_type"] == "code" and (
            c.get("outputs") != d.get("outputs")
            or c.get("execution_count") != d.get("execution_count")
        ):
            problems.append(f"cell {cid}: outputs or execution count changed")
    for d in after["cells"]:
        if d.get("id") not in old and d.get("outputs"):
            problems.append(f"new cell {d.get('id')} has outputs")
    kept_order = [i for i in ids if i in old]
    if kept_order != [c.get("id") for c in before["cells"]]:
        problems.append("cells were reordered")
    return problems


def process(path: Path, report: Report) -> tuple[str, str]:
    """(the file's text, the tidied text)."""
    text = path.read_text(encoding="utf-8")
    nb = json.loads(text)
    tidied = format_code(tidy(nb, path, report), path, report)
    problems = outputs_problems(nb, tidied)
    if problems:
        raise SystemExit(f"{path}: refusing to write: " + "; ".join(problems))
    return text, dumps(tidied)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="+", type=Path)
    parser.add_argument(
        "--check", action="store_true", help="change nothing; exit 1 if a run would"
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="print only what is wrong")
    args = parser.parse_args(argv)
    report = Report()
    would_change = []
    for path in args.notebooks:
        old, new = process(path, report)
        if old != new:
            would_change.append(path)
            if not args.check:
                path.write_text(new, encoding="utf-8")
    if args.check:
        for path in would_change:
            print(f"would change {path}")
    elif not args.quiet:
        print(
            f"{len(would_change)} of {len(args.notebooks)} notebooks changed: "
            f"{report.markers} nbval markers turned into tags, {report.split} cells split, "
            f"{report.hidden} cells hidden whole, {report.reformatted} lines reformatted"
        )
    for line in report.unresolved:
        print(f"checks left in place: {line}")
    for line in report.long_lines:
        print(f"over {MAX_LINE} columns (fix by hand): {line}")
    # --check also fails on what a run cannot do: lines and checks left for a hand fix
    return 1 if args.check and (would_change or report.long_lines or report.unresolved) else 0


if __name__ == "__main__":
    sys.exit(main())
