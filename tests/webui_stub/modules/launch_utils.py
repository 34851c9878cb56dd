"""Stub of modules/launch_utils.py (WebUI v1.10.1): package checks for extensions' install.py.

``run_pip`` records the command instead of running pip, so tests never install anything.
"""
import argparse
import importlib.metadata
import importlib.util
import sys

args = argparse.Namespace(skip_install=False)
python = sys.executable
index_url = ""
pip_calls: list = []


def is_installed(package):
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        try:
            spec = importlib.util.find_spec(package)
        except ModuleNotFoundError:
            return False
        return spec is not None
    return dist is not None


def run_pip(command, desc=None, live=False):
    if args.skip_install:
        return
    pip_calls.append((command, desc))
    return ""
