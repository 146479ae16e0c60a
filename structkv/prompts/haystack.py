"""Deterministic prose built at run time from text already on the machine.

Why stdlib docstrings: they are real English prose, present on every Python install, and need
no download; nothing of them is copied into the repository. The module list and order are
fixed, so the same Python version always yields the same text. ``--haystack-file`` (a user's
own text) replaces them where exact reproducibility across Python versions matters.
"""

from __future__ import annotations

import importlib
import inspect
import re
import warnings
from functools import cache

#: Modules whose docstrings form the prose pool (fixed order => deterministic text).
SOURCE_MODULES = (
    "argparse", "asyncio", "collections", "contextlib", "csv", "dataclasses", "datetime",
    "decimal", "difflib", "email.message", "enum", "fractions", "functools", "heapq",
    "http.client", "imaplib", "inspect", "ipaddress", "itertools", "json", "logging", "mailbox",
    "multiprocessing", "optparse", "pathlib", "pickle", "pydoc", "random", "re", "shutil",
    "smtplib", "socket", "sqlite3", "statistics", "string", "subprocess", "tarfile", "tempfile",
    "textwrap", "threading", "tkinter", "typing", "unittest", "urllib.request", "uuid",
    "warnings", "xml.dom.minidom", "zipfile",
)  # fmt: skip


def _clean(doc: str) -> list[str]:
    """Paragraphs of plain sentences: drop code, tables, doctest lines and short fragments."""
    out = []
    for para in re.split(r"\n\s*\n", inspect.cleandoc(doc)):
        lines = [ln.strip() for ln in para.splitlines()]
        if any(ln.startswith((">>>", "...", "|", "+", "-", "*", ":")) for ln in lines):
            continue
        text = " ".join(lines)
        if len(text) < 80 or not text[0].isupper() or not text.endswith("."):
            continue
        if sum(c.isalpha() or c == " " for c in text) < 0.9 * len(text):
            continue
        out.append(text)
    return out


@cache
def stdlib_paragraphs() -> tuple[str, ...]:
    """All usable paragraphs, de-duplicated, in a fixed order (the evaluation's prose)."""
    return _module_paragraphs(SOURCE_MODULES)


#: Calibration prose (§6): other modules' docstrings, so that calibration never sees the
#: evaluation's haystack (paragraphs also found in the evaluation pool are dropped).
CALIBRATION_MODULES = (
    "abc", "ast", "base64", "bisect", "calendar", "cmd", "codecs", "configparser", "copy",
    "ctypes", "dis", "doctest", "filecmp", "fnmatch", "ftplib", "getopt", "gettext", "glob",
    "gzip", "hashlib", "hmac", "html.parser", "io", "locale", "mimetypes", "numbers",
    "operator", "os", "platform", "plistlib", "poplib", "pprint", "queue", "sched", "secrets",
    "selectors", "shelve", "signal", "socketserver", "ssl", "struct", "sysconfig", "timeit",
    "token", "tokenize", "trace", "traceback", "types", "weakref", "xmlrpc.client", "zipimport",
)  # fmt: skip


def _module_paragraphs(modules: tuple[str, ...]) -> tuple[str, ...]:
    seen, out = set(), []
    for name in modules:
        try:
            module = importlib.import_module(name)
        except ImportError:  # e.g. tkinter missing on a slim Python
            continue
        docs = [module.__doc__ or ""]
        with warnings.catch_warnings():  # e.g. typing.io's deprecation on attribute access
            warnings.simplefilter("ignore")
            for attr in sorted(dir(module)):
                if not attr.startswith("_"):
                    docs.append(getattr(getattr(module, attr, None), "__doc__", None) or "")
        for doc in docs:
            if not isinstance(doc, str):
                continue
            for para in _clean(doc):
                if para not in seen:
                    seen.add(para)
                    out.append(para)
    return tuple(out)


@cache
def calibration_paragraphs() -> tuple[str, ...]:
    """The calibration prose pool: disjoint from :func:`stdlib_paragraphs` by construction."""
    evaluation = set(stdlib_paragraphs())
    return tuple(p for p in _module_paragraphs(CALIBRATION_MODULES) if p not in evaluation)


def paragraphs(haystack_file: str | None = None) -> tuple[str, ...]:
    if haystack_file is None:
        return stdlib_paragraphs()
    with open(haystack_file, encoding="utf-8") as f:
        text = f.read()
    paras = tuple(p.strip().replace("\n", " ") for p in re.split(r"\n\s*\n", text) if p.strip())
    if not paras:
        raise ValueError(f"{haystack_file} holds no text paragraphs")
    return paras
