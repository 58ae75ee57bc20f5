"""The demo world: controlled sentiment with SmolLM2-135M-Instruct, a distilled weak pair and VADER.

`wspo demo --out DIR` chains the reusable stages of `wspo_lightning.pipeline`; the phases are in `run.py`.
"""
