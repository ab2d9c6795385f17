"""A griffe extension for the API reference: fedjax_sim's field lists rendered as tables.

fedjax_sim's docstrings list a class's fields and a function's parameters as lines
`name: description` (continued on lines indented further), without a section header:

    noise_multiplier: z; the noise std on the sum of updates is z·C.
    delta: δ of the (ε, δ) guarantee; keep it well below 1/num_clients.

(a class's function-valued fields also as `name(args) -> result` lines, their description
indented below).

Markdown would run such lines together into one paragraph. This extension puts a
Google-style header above every run of two or more such lines whose names are all the
object's own fields or parameters ("Attributes:" for a class, "Args:" for a function),
so that mkdocstrings renders the run as a table. Only the text mkdocstrings renders
changes; the source files and `help()` stay as they are. mkdocs.yml loads it.
"""

from __future__ import annotations

import re

import griffe

# `name: text`, `a / b: text` (several fields described together), `name (note): text`.
ITEM = re.compile(r"^(?P<names>\w+(?:\s*/\s*\w+)*)(?:\s*\((?P<note>[^)]*)\))?: (?P<text>.*)$")
# `name(args) -> result` (a class's function-valued field, described on the lines below).
SIGNATURE = re.compile(r"^(?P<names>\w+)\(.*$")


def _split_signature(line: str) -> tuple[str, str]:
    """`name(args) -> result: text` into the signature and the text (at the first ': '
    after '->' outside parentheses; all signature when there is none)."""
    depth, start = 0, line.find("->")
    for i in range(max(start, 0), len(line) - 1):
        depth += {"(": 1, "[": 1, ")": -1, "]": -1}.get(line[i], 0)
        if start >= 0 and depth == 0 and line[i:i + 2] == ": ":
            return line[:i], line[i + 2:]
    return line, ""


def _item(line: str, known: set[str], for_class: bool):
    """(names, note, text) when `line` starts an item naming only `known` names."""
    match = ITEM.match(line)
    if not match and for_class and (signature := SIGNATURE.match(line)):
        if signature["names"] not in known:
            return None
        code, text = _split_signature(line)
        quote = "``" if "`" in code else "`"
        return [signature["names"]], None, f"{quote}{code}{quote}" + (f": {text}" if text else "")
    if not match:
        return None
    names = [n.strip() for n in match["names"].split("/")]
    if not set(names) <= known or (len(names) > 1 and not for_class):
        return None
    return names, match["note"], match["text"]


def with_field_lists(text: str, known: set[str], header: str, for_class: bool) -> str:
    """`text` with a `header` line above each run of >= 2 items, the run indented under it."""
    lines, out, i = text.split("\n"), [], 0
    while i < len(lines):
        starts_paragraph = i == 0 or not lines[i - 1].strip()
        run, j = [], i
        while starts_paragraph and j < len(lines):
            item = _item(lines[j], known, for_class)
            if item is None:
                break
            names, note, rest = item
            run.append("    " + "/".join(names) + ": " + (f"({note}) " if note else "") + rest)
            j += 1
            base = None  # the item's continuation indent, re-based to Google's 8 spaces
            while j < len(lines) and lines[j][:1].isspace() and lines[j].strip():
                indent = len(lines[j]) - len(lines[j].lstrip())
                base = indent if base is None else min(base, indent)
                run.append(" " * (8 + indent - base) + lines[j].lstrip())
                j += 1
        if sum(line.startswith("    ") and not line.startswith("     ") for line in run) < 2:
            out.append(lines[i])
            i += 1
            continue
        if out and out[-1].strip():
            out.append("")
        out += [header] + run
        if j < len(lines) and lines[j].strip():
            out.append("")
        i = j
    return "\n".join(out)


class FieldLists(griffe.Extension):
    """Gives the field lists of classes and functions their section header."""

    def on_class_members(self, *, cls: griffe.Class, **kwargs) -> None:
        if cls.docstring:
            cls.docstring.value = with_field_lists(cls.docstring.value, set(cls.members),
                                                   "Attributes:", for_class=True)

    def on_function_instance(self, *, func: griffe.Function, **kwargs) -> None:
        if func.docstring:
            known = {p.name for p in func.parameters}
            func.docstring.value = with_field_lists(func.docstring.value, known, "Args:",
                                                    for_class=False)
