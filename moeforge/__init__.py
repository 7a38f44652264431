"""The `moeforge` command line. The libraries are `moeforge.compiler`, `moeforge.runtime` and `moeforge.search`."""

__version__ = "0.1.0"
