#!/usr/bin/env python3
"""Lists the C++/CUDA functions longer than a limit (default 100 lines), and the files longer
than another (default 600 lines), under the given folders (default: plugins, tests/cpp).

    python3 scripts/long_functions.py                  # functions > 100 lines, files > 600
    python3 scripts/long_functions.py --lines 60 plugins/common
    python3 scripts/long_functions.py --all            # every function, longest first

A heuristic scanner, not a parser: comments, strings and preprocessor lines are blanked, then
braces are matched. A `{` outside any function body opens a function body when the text before
it (since the last `;`, `{` or `}`) has a parameter list and is not a namespace, class, struct,
union, enum, extern block or variable initializer; lambdas and blocks inside a body count
towards that body. A function's length runs from the first line of its signature to its
closing brace. Exit status 0 always: this reports, it does not judge (kernels may be long when
their file's header comment says why).
"""
from __future__ import annotations

import argparse
import pathlib
import re
import signal
import sys

SUFFIXES = {".cpp", ".cc", ".h", ".hpp", ".cu", ".cuh", ".inc"}
CONTAINER = re.compile(r"^\s*(template\s*<.*>\s*)?(namespace|class|struct|union|enum)\b|"
                       r"^\s*extern\s+\"C\"", re.S)


def blank_noncode(text: str) -> str:
    """Comments, string/char literals and preprocessor lines replaced by spaces (newlines kept)."""
    out = []
    i, n = 0, len(text)
    line_start = True
    while i < n:
        c = text[i]
        if line_start and c == "#" or (line_start and text[i:].lstrip(" \t").startswith("#")
                                         and c in " \t"):
            j = i
            while j < n:  # to the end of the line, following backslash continuations
                k = text.find("\n", j)
                k = n if k < 0 else k
                if k > 0 and text[k - 1] == "\\":
                    j = k + 1
                    continue
                break
            out.append(re.sub(r"[^\n]", " ", text[i:k]))
            i = k
            continue
        if text.startswith("//", i):
            k = text.find("\n", i)
            k = n if k < 0 else k
            out.append(" " * (k - i))
            i = k
            continue
        if text.startswith("/*", i):
            k = text.find("*/", i + 2)
            k = n if k < 0 else k + 2
            out.append(re.sub(r"[^\n]", " ", text[i:k]))
            i = k
            continue
        if c in "\"'":
            j = i + 1
            while j < n and text[j] != c:
                j += 2 if text[j] == "\\" else 1
            out.append(c + " " * (min(j, n - 1) - i - 1) + c if j < n else " " * (n - i))
            i = j + 1
            continue
        out.append(c)
        line_start = c == "\n" or (line_start and c in " \t")
        i += 1
    return "".join(out)


def _strip_parens(s: str) -> str:
    depth, out = 0, []
    for ch in s:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif depth == 0:
            out.append(ch)
    return "".join(out)


def is_function_head(head: str) -> bool:
    if "(" not in head or CONTAINER.search(head):
        return False
    outside = _strip_parens(head)
    if "operator" not in head and re.search(r"(?<![=!<>])=(?![=])", outside):
        return False  # an initializer: `T x = [] {`, `T a[] = {`
    return not re.match(r"^\s*(if|for|while|switch|catch|do|else|try)\b", head)


def functions(path: pathlib.Path):
    """(first line, last line, name) of every function body in the file."""
    code = blank_noncode(path.read_text(errors="replace"))
    stack: list[str] = []  # "f": a function body, "b": a block inside one, "c": a container
    head_start = 0
    result = []
    starts: list[tuple[int, str]] = []
    for i, ch in enumerate(code):
        if ch == "{":
            if "f" in stack:
                stack.append("b")
            else:
                head = code[head_start:i]
                if is_function_head(head):
                    first = head_start + len(head) - len(head.lstrip())
                    starts.append((code.count("\n", 0, first) + 1, _name(head)))
                    stack.append("f")
                else:
                    stack.append("c")
            head_start = i + 1
        elif ch == "}":
            kind = stack.pop() if stack else "c"
            if kind == "f":
                line0, name = starts.pop()
                result.append((line0, code.count("\n", 0, i) + 1, name))
            head_start = i + 1
        elif ch == ";":
            head_start = i + 1
    return result


ATTRIBUTES = {"__launch_bounds__", "__attribute__", "__declspec", "alignas", "decltype"}


def _name(head: str) -> str:
    """The function's name: the first `name(` of the head that is not an attribute."""
    for name in re.findall(r"(operator\s*\S+?|[~\w:]+)\s*\(", _strip_attributes(head)):
        if name not in ATTRIBUTES:
            return name
    return "?"


def _strip_attributes(head: str) -> str:
    for attr in ATTRIBUTES:
        while (i := head.find(attr + "(")) >= 0:
            depth, j = 0, i + len(attr)
            for j in range(i + len(attr), len(head)):
                depth += {"(": 1, ")": -1}.get(head[j], 0)
                if depth == 0:
                    break
            head = head[:i] + head[j + 1:]
    return head


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # quiet under `| head`
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("paths", nargs="*", default=["plugins", "tests/cpp"])
    ap.add_argument("--lines", type=int, default=100, help="function length limit")
    ap.add_argument("--file-lines", type=int, default=600, help="file length limit")
    ap.add_argument("--all", action="store_true", help="every function, longest first")
    args = ap.parse_args(argv)
    files = []
    for p in map(pathlib.Path, args.paths):
        files += sorted(f for f in p.rglob("*") if f.suffix in SUFFIXES) if p.is_dir() else [p]
    rows = []
    for f in files:
        for first, last, name in functions(f):
            rows.append((last - first + 1, f"{f}:{first}", name))
        n = f.read_text(errors="replace").count("\n")
        if n > args.file_lines:
            print(f"file {f}: {n} lines")
    rows.sort(reverse=True)
    for length, where, name in rows:
        if args.all or length > args.lines:
            print(f"{length:5d}  {where}  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
