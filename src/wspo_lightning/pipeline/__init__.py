"""Reusable experiment stages: sample, score, pairs, distill, fit, evaluate.

Each stage is a plain function that reads and writes files, skips itself when its output
already exists (`force=True` redoes it), and shows a progress bar. Each also has a
`main(argv)` so it runs as `wspo <stage> ...`. The demo (`wspo_lightning.demo`) chains them.
"""
