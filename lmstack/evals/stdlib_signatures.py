"""An instruction-following task with exact answers, generated from Python's own standard library.

Each question shows the signature of one public standard-library function (as
:func:`inspect.signature` prints it) and asks which parameters every call must pass; the
answer is their names in order, joined by ``", "``, or ``none``::

    Which parameters must every call of `textwrap.wrap(text, width=70, **kwargs)` pass? Answer
    with their names separated by commas, or none.
    -> text

A required parameter is one without a default that is neither ``*args`` nor ``**kwargs``
(positional-only and keyword-only ones count). The answer is in the question, so a small
model can learn the skill and its exact format; the base instruct model answers in prose.

Functions: :func:`lmstack.evals.stdlib_docstrings.public_functions` of each module of
:data:`MODULES` (Python functions defined there, public) whose signature prints in at most
:data:`MAX_SIGNATURE` characters without an object address, at most ``per_module`` of them
per module (a seeded choice, in name order). The split is by module: the ``n_heldout`` modules
with the smallest CRC-32 of ``"{seed}:{module}"`` are held out, so no held-out question comes
from a module seen in training. Deterministic for a given Python (the exact questions follow
the running Python's standard library). :func:`signature_files` writes both splits as
``prompt_completion`` JSONL into the lmstack cache (what ``experiments/stdlib_sft.py`` reads).
"""

from __future__ import annotations

import inspect
import pathlib
import random
import sys
import warnings
import zlib

from lmstack.data.formats import task_files
from lmstack.evals.stdlib_docstrings import public_functions

# Pure-Python modules whose import has no side effects, each with public functions.
MODULES = (
    "abc", "ast", "base64", "bdb", "calendar", "codecs", "colorsys", "compileall", "contextlib", "copy", "copyreg",
    "dataclasses", "difflib", "dis", "doctest", "email.utils", "enum", "filecmp", "fileinput", "fnmatch", "ftplib",
    "functools", "genericpath", "getopt", "getpass", "gettext", "glob", "gzip", "hashlib", "heapq", "hmac", "html",
    "imaplib", "importlib", "inspect", "ipaddress", "linecache", "locale", "logging", "lzma", "mimetypes",
    "ntpath", "optparse", "os", "pickle", "pickletools", "pkgutil", "platform", "plistlib", "posixpath", "pprint",
    "profile", "pstats", "py_compile", "pyclbr", "pydoc", "quopri", "re", "runpy", "secrets", "shlex", "shutil",
    "site", "smtplib", "socket", "ssl", "statistics", "subprocess", "sysconfig", "tabnanny", "tarfile", "tempfile",
    "textwrap", "threading", "timeit", "token", "tokenize", "traceback", "types", "typing", "urllib.parse",
    "urllib.request", "uuid", "warnings", "xml.dom.minidom", "xml.etree.ElementTree", "zipapp", "zipfile",
)
MAX_SIGNATURE = 100
QUESTION = ("Which parameters must every call of `{module}.{name}{signature}` pass? Answer with their names "
            "separated by commas, or none.")
SPLITS = ("train", "test")
_VARIADIC = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)


def required_parameters(signature: inspect.Signature) -> str:
    """The task's answer: the names of the parameters without a default (not ``*args`` or
    ``**kwargs``) in order, joined by ``", "``; ``none`` when there are none."""
    names = [p.name for p in signature.parameters.values()
             if p.default is inspect.Parameter.empty and p.kind not in _VARIADIC]
    return ", ".join(names) or "none"


def signature_questions(module_name: str, *, per_module: int, seed: int) -> list[dict[str, str]]:
    """``{"module", "function", "prompt", "completion"}`` for up to ``per_module`` functions of
    the module (see the module docstring), in name order."""
    found = []
    for name, fn in public_functions(module_name):
        try:
            signature = inspect.signature(fn)
        except (TypeError, ValueError):
            continue
        text = str(signature)
        if len(text) <= MAX_SIGNATURE and " at 0x" not in text:
            found.append((name, signature))
    if len(found) > per_module:
        keep = set(random.Random(f"{seed}:{module_name}").sample(range(len(found)), per_module))
        found = [f for i, f in enumerate(found) if i in keep]
    return [{"module": module_name, "function": name,
             "prompt": QUESTION.format(module=module_name, name=name, signature=signature),
             "completion": required_parameters(signature)} for name, signature in found]


def heldout_modules(*, n_heldout: int, seed: int) -> tuple[str, ...]:
    """The ``n_heldout`` modules of :data:`MODULES` with the smallest CRC-32 of ``"{seed}:{module}"``,
    in :data:`MODULES` order."""
    ranked = sorted(MODULES, key=lambda m: zlib.crc32(f"{seed}:{m}".encode()))
    chosen = set(ranked[:n_heldout])
    return tuple(m for m in MODULES if m in chosen)


def signature_task(split: str, *, n_heldout: int = 13, per_module: int = 10, seed: int = 0) -> list[dict[str, str]]:
    """The questions of ``split`` (``train``: the modules not held out; ``test``: the held-out
    ones), in module order. ValueError for an unknown split."""
    if split not in SPLITS:
        raise ValueError(f"stdlib_signatures split={split!r}: unknown; choose one of {', '.join(SPLITS)}")
    held = set(heldout_modules(n_heldout=n_heldout, seed=seed))
    rows = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # a module may warn that it is going away
        for module_name in MODULES:
            if (module_name in held) == (split == "test"):
                rows += signature_questions(module_name, per_module=per_module, seed=seed)
    return rows


def signature_files(*, n_heldout: int = 13, per_module: int = 10, seed: int = 0) -> dict[str, pathlib.Path]:
    """``{"train": PATH, "test": PATH}``: :func:`signature_task`'s splits as ``prompt_completion``
    JSONL in the lmstack cache (:func:`lmstack.data.formats.task_files`), in a folder named by
    the Python version and every argument."""
    version = "py{}.{}.{}".format(*sys.version_info[:3])
    name = f"stdlib-signatures-{version}-heldout{n_heldout}-per{per_module}-seed{seed}"
    return task_files(name, {split: (lambda s=split: signature_task(s, n_heldout=n_heldout, per_module=per_module,
                                                                    seed=seed)) for split in SPLITS})
