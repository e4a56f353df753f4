# Record SIGINT/SIGTERM before the CLI's imports, so a signal at any point of a
# `python -m edgellm_export` run ends it with exit 130 / 143, never by the signal.
from .interrupts import install_for_process

install_for_process()

from .cli import entry  # noqa: E402

entry()
