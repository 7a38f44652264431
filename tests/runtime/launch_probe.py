"""A child process of tests/runtime/test_launch.py: says which moeforge it imported, on stdout or (under
torchrun, one file per rank) in the folder $PROBE_OUT."""

import os
from pathlib import Path

import moeforge.runtime

import moeforge

line = f"{moeforge.__file__} {moeforge.runtime.__file__}"
if "PROBE_OUT" in os.environ:
    Path(os.environ["PROBE_OUT"], f"rank-{os.environ.get('RANK', '0')}.txt").write_text(line)
else:
    print(f"- {line}", flush=True)
