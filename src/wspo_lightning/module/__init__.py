"""LightningModules: WSPO, and the DPO and SFT baselines trained the same way.

A module owns the trainable policy and the bookkeeping; the maths lives in `losses.py`, the frozen
models in `FrozenRoles` (`frozen.py`). With `cache_dir` (built by `wspo precompute`) the frozen
roles' values come from disk and only the policy loads. Configs name them `wspo_lightning.module.NAME`.
"""

from wspo_lightning.module.base import PreferenceModule, sequences, step_rows
from wspo_lightning.module.baselines import DPOModule, SFTModule
from wspo_lightning.module.wspo import WSPOModule

__all__ = ["DPOModule", "PreferenceModule", "SFTModule", "WSPOModule", "sequences", "step_rows"]
