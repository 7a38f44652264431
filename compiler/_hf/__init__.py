"""Hugging Face interop, one concept per module, each importing only those above it:

- `formats`: the stock model types moeforge reads and writes, their constants and `HFError`;
- `importer`: config.json -> spec, one reader per family;
- `expressible`: which stock format computes a spec exactly (or the nearest one, and why not);
- `export`: spec -> config.json;
- `weights`: tensor name maps both ways;
- `card`: the model card of an export;
- `io`: model folders on disk (`import_hf`, `export_hf`, reading checkpoints);
- `check`: the comparison with transformers (`export hf --check`).

`moeforge.compiler` re-exports what other packages use.
"""
