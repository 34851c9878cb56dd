"""Stub of the WebUI's top-level launch.py (v1.10.1): the names extensions' install.py use."""
from modules import launch_utils

args = launch_utils.args
python = launch_utils.python
is_installed = launch_utils.is_installed
run_pip = launch_utils.run_pip
