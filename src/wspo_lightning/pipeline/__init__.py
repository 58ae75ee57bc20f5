"""Reusable experiment stages: convert, sample, score, pairs, distill, fit, precompute, evaluate, extrapolate.

Each stage is a plain function that reads and writes files, skips itself when its output
already exists (`force=True` redoes it), and shows a progress bar. Each runs as `wspo <stage> ...`
too: from its `main(argv)`, or, for `fit` and `precompute`, as the LightningCLI command it wraps.
The demo (`wspo_lightning.demo`) chains them.
"""
