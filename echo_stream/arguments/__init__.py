"""The argument definitions of every ``echo-stream`` command, apart from the code that runs them.

:mod:`echo_stream.cli` builds its whole argparse tree from these modules and imports a command's
own module (torch, Ray, librosa, PyAV ...) only when that command runs, so that ``echo-stream
--help`` and every ``<command> --help`` answer at once. These modules therefore import nothing
heavier than :mod:`argparse` and the standard library: a default that a library module also uses
is written here (``tests/test_cli.py`` checks that the two agree), and a command's long
description is its module's docstring, read from the source file without importing it
(:func:`module_doc`).

=====================  ===========================================================
module                 commands
=====================  ===========================================================
``generate``           generate, demo
``data``               corpus, shards, preprocess
``face``               track
``training``           train, eval
``serve``              serve, client
``bench``              bench pipeline / serve / preprocess / tracker / kernels
=====================  ===========================================================
"""
from __future__ import annotations

import ast
import importlib.util


def module_doc(module: str) -> str:
    """The docstring of ``module`` (a dotted name), read from its source without importing it
    (its parent packages are imported: they must be light). ``""`` when there is no source."""
    try:
        spec = importlib.util.find_spec(module)
    except ImportError:
        return ""
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return ""
    try:
        with open(spec.origin, encoding="utf-8") as f:
            return ast.get_docstring(ast.parse(f.read())) or ""
    except (OSError, SyntaxError, ValueError):
        return ""
