"""The `moeforge` command line. The libraries are `compiler`, `runtime` and `search`."""

__version__ = "0.1.0"
