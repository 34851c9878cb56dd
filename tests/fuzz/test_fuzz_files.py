"""Malformed files: every one is either loaded (and then inspectable and mergeable) or refused
with the loader's own LoraFileError; nothing else escapes, no case hangs or runs out of memory.

``pytest tests/fuzz --cases 3000`` runs more cases; ``-s`` prints the count per outcome class.
"""
from __future__ import annotations

import sys

import pytest

from .runner import DEFAULT_LIBRARIES, run_cases, summary

PASS = ("loaded", "LoraFileError")
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the runner caps memory with setrlimit "
                                "and the library case makes a FIFO")


@pytest.fixture(scope="module")
def n_cases(request) -> int:
    return request.config.getoption("--cases")


def _check(results, n, ok) -> None:
    print("\n" + summary(results))
    assert len(results) == n
    bad = [r for r in results if r["outcome"] not in ok]
    assert not bad, summary(results)


def test_fuzzed_files(n_cases):
    results = run_cases(n_cases, seed=0)
    _check(results, n_cases, PASS)
    outcomes = {r["outcome"] for r in results}
    assert outcomes == set(PASS)  # a generator whose every case loads (or none does) tests nothing


def test_fuzzed_library_scan():
    results = run_cases(DEFAULT_LIBRARIES, seed=1, library=True)
    _check(results, DEFAULT_LIBRARIES, ("library:ok",))
