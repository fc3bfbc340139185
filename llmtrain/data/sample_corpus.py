"""The quickstart corpus: English text that ships with Python itself, so it exists on any fresh
machine without network (about 2-3 MB, deterministic for a given Python build).

    files = write_sample_corpus("runs/sample-corpus")   # -> [pydoc_topics.jsonl, stdlib_docstrings.jsonl]
    python -m llmtrain.data.sample_corpus OUT_DIR

Documents (one JSON object per line, the text in field "text", so document boundaries are
exact; `source` says where it came from):
- `pydoc_topics.jsonl`: one document per help topic of `pydoc_data.topics` (the language
  reference sections that `help("if")` shows), in topic-name order.
- `stdlib_docstrings.jsonl`: one document per standard-library module (test suites, idlelib,
  lib2to3, turtledemo and site-packages excluded), in path order: the module's dotted name, its
  docstring, then each class and function that has a docstring, as a `class Name(bases)` or
  `def name(args)` line followed by the docstring. Sources are parsed with `ast` (nothing is
  imported or executed).
"""

from __future__ import annotations

import ast
import json
import os
import sys
import sysconfig
from pathlib import Path
from typing import Iterator

from llmtrain.data.atomic import atomic_dir

_SKIP_DIRS = {"test", "tests", "idlelib", "lib2to3", "turtledemo", "site-packages", "dist-packages", "__pycache__", "_bundled"}


def pydoc_topics() -> Iterator[tuple[str, str]]:
    from pydoc_data.topics import topics

    for name in sorted(topics):
        text = topics[name].strip()
        if text:
            yield f"pydoc_data.topics:{name}", text


def _stdlib_files(root: Path) -> Iterator[Path]:
    for directory, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not d.startswith("."))
        for name in sorted(names):
            if name.endswith(".py"):
                yield Path(directory) / name


def _module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts) or path.stem


def _header(node: ast.AST) -> str:
    if isinstance(node, ast.ClassDef):
        bases = ", ".join(ast.unparse(b) for b in node.bases)
        return f"class {node.name}({bases})" if bases else f"class {node.name}"
    prefix = "async def" if isinstance(node, ast.AsyncFunctionDef) else "def"
    return f"{prefix} {node.name}({ast.unparse(node.args)})"


def _definitions(body: list[ast.stmt], depth: int = 0) -> Iterator[str]:
    for node in body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc:
                indent = "    " * depth
                text = "\n".join(indent + line if line else line for line in doc.splitlines())
                yield f"{indent}{_header(node)}\n{text}"
            if isinstance(node, ast.ClassDef):
                yield from _definitions(node.body, depth + 1)


def stdlib_docstrings(root: Path | None = None) -> Iterator[tuple[str, str]]:
    root = Path(root or sysconfig.get_paths()["stdlib"])
    for path in _stdlib_files(root):
        try:
            tree = ast.parse(path.read_bytes(), filename=str(path))
        except (SyntaxError, ValueError, UnicodeDecodeError):
            continue
        name = _module_name(root, path)
        parts = [name]
        module_doc = ast.get_docstring(tree)
        if module_doc:
            parts.append(module_doc)
        parts += list(_definitions(tree.body))
        if len(parts) > 1:
            yield f"stdlib:{name}", "\n\n".join(parts)


def write_sample_corpus(out_dir: str | os.PathLike) -> list[Path]:
    """Write the two JSONL files into `out_dir`; return their paths. Files already there with
    the same bytes are left untouched (so their mtimes, and a prepared dir built from them, stay
    up to date); otherwise the directory is replaced as a whole."""
    out_dir = Path(out_dir)
    sources = {"pydoc_topics.jsonl": pydoc_topics(), "stdlib_docstrings.jsonl": stdlib_docstrings()}
    contents = {
        name: "".join(json.dumps({"text": text, "source": source}, ensure_ascii=False) + "\n" for source, text in docs).encode()
        for name, docs in sources.items()
    }
    paths = [out_dir / name for name in contents]
    if all(p.is_file() and p.read_bytes() == contents[p.name] for p in paths):
        return paths
    with atomic_dir(out_dir, replace=True) as tmp:
        for name, data in contents.items():
            (tmp / name).write_bytes(data)
    return paths


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m llmtrain.data.sample_corpus OUT_DIR")
    for p in write_sample_corpus(sys.argv[1]):
        print(p, p.stat().st_size)
