"""A child process of tests/runtime/test_launch.py: prints which moeforge it imported (and its rank)."""

import os

import moeforge.runtime

import moeforge

print(f"{os.environ.get('RANK', '-')} {moeforge.__file__} {moeforge.runtime.__file__}", flush=True)
