"""Command-line data tools (``python -m lightning_vlm data ...``): convert real data to shards, inspect shards,
generate the synthetic benchmark."""
