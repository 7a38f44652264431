"""How moeforge starts its own child processes (search workers, torchrun groups) so that they run the same
moeforge as the process that started them, whatever the working directory.

``python -m moeforge`` puts the working directory first on ``sys.path``. Run from inside a source checkout
with a non-editable install, the checkout's ``moeforge/`` folder then shadows the installed package, and
since the checkout keeps ``moeforge.compiler`` in ``compiler/`` (pyproject's package-dir), every child dies
with ``No module named 'moeforge.compiler'``. ``python -P`` (PYTHONSAFEPATH) would prevent that, but only
from Python 3.11; so children start as ``python -u -c BOOT MODULE ARGS...``, where BOOT drops the working
directory from ``sys.path`` (``-c`` puts it there as ``''``) and runs MODULE as ``-m`` would. The child's
``sys.argv`` is then ``[MODULE path, *ARGS]``, as with ``-m``.

No torch here: the search's driver starts workers before it needs torch.
"""

from __future__ import annotations

import sys

BOOT = (
    "import runpy, sys\n"
    "if sys.path and sys.path[0] == '':\n"  # the working directory, which -c puts first
    "    del sys.path[0]\n"
    "module = sys.argv.pop(1)\n"
    "runpy.run_module(module, run_name='__main__', alter_sys=True)\n"
)
"""The ``-c`` program of every child: a cwd-independent ``python -m``."""


def python_module_cmd(module: str, *args: str) -> list[str]:
    """The command that runs ``python -m module args...`` in a child that imports moeforge from where this
    process does (this interpreter, the working directory not on the path)."""
    return [sys.executable, "-u", "-c", BOOT, module, *args]


def torchrun_args(nproc: int, module: str, *args: str) -> list[str]:
    """torchrun's (``torch.distributed.run``) arguments that start `nproc` processes on this machine, each
    running ``python -m module args...`` as `python_module_cmd` does (torchrun's own ``-m`` would put the
    working directory first on the children's path)."""
    return [
        "--standalone",
        f"--nproc_per_node={nproc}",
        "--no-python",
        *python_module_cmd(module, *args),
    ]
