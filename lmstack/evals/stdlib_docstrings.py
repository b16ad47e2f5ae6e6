"""``task=stdlib_docstrings``: a multiple-choice task built from Python's own standard library,
so every evaluator test and smoke run works offline with nothing downloaded.

Each document gives a module and the first line of one of its public functions' docstrings;
the four choices are that function's name and three other functions of the same module,
in a seeded random order. Built deterministically with :mod:`inspect` from :data:`MODULES`
(functions defined in Python, in name order, whose docstring's first line is at least 10
characters and unique within the module); the exact documents follow the running Python's
version of the standard library.
"""

from __future__ import annotations

import importlib
import inspect
import random
from typing import Callable

MODULES = ("base64", "calendar", "difflib", "fnmatch", "functools", "json", "quopri", "re", "shutil", "statistics",
           "tempfile", "textwrap", "urllib.parse")
N_CHOICES = 4


def public_functions(module_name: str) -> list[tuple[str, Callable]]:
    """(name, function) of the module's public functions written in Python and defined in it
    (not imported into it), sorted by name."""
    module = importlib.import_module(module_name)
    return [(name, obj) for name, obj in sorted(vars(module).items())
            if not name.startswith("_") and inspect.isfunction(obj) and obj.__module__ == module.__name__]


def documented_functions(module_name: str) -> list[tuple[str, str]]:
    """(name, first docstring line) of the module's public Python functions, sorted by name."""
    found = []
    for name, obj in public_functions(module_name):
        doc = inspect.getdoc(obj)
        first = doc.strip().splitlines()[0].strip() if doc and doc.strip() else ""
        if len(first) >= 10:
            found.append((name, first))
    lines = [first for _, first in found]
    return [(name, first) for name, first in found if lines.count(first) == 1]


def stdlib_docstrings(seed: int = 0) -> list[dict]:
    """``{"query", "choices", "gold"}`` documents (see the module docstring), in module order."""
    rnd = random.Random(seed)
    docs = []
    for module_name in MODULES:
        functions = documented_functions(module_name)
        names = [name for name, _ in functions]
        for name, first in functions:
            choices = rnd.sample([n for n in names if n != name], N_CHOICES - 1) + [name]
            rnd.shuffle(choices)
            docs.append({"query": f"Module: {module_name}\nDocstring: {first}\nFunction:", "choices": choices,
                         "gold": choices.index(name)})
    return docs
