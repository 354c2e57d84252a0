"""Schemathesis' `st`, with Hypothesis' strategy descriptions simplified.

Hypothesis names a filtered strategy by parsing the source file of its lambda. Under CPython
3.11, parsing Schemathesis' 5,000-line coverage module from deep inside the coverage phase fails
with "AST constructor recursion depth mismatch" (an interpreter bug), which Schemathesis reports
as a runtime error of whichever operation it was generating. The description is only used in
reprs, so naming the function is enough.
"""

import sys

import hypothesis.internal.reflection as reflection
import hypothesis.strategies._internal.lazy as lazy


def describe(function):
    return getattr(function, "__qualname__", repr(function))


reflection.get_pretty_function_description = describe
lazy.get_pretty_function_description = describe

from schemathesis.cli import schemathesis  # noqa: E402  (after the patch)

sys.exit(schemathesis())
