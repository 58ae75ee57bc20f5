"""The constructor arguments every objective shares are declared once, by `PreferenceModule`: each objective
takes them through `**kwargs`, its CLI (jsonargparse) still lists every one with the base's type, default and
help, and its saved hyperparameters hold every argument."""

from __future__ import annotations

import inspect

import pytest
import torch
from jsonargparse import ArgumentParser

from wspo_lightning.module import DPOModule, PreferenceModule, SFTModule, WSPOModule

SHARED = [name for name in inspect.signature(PreferenceModule.__init__).parameters if name != "self"]
OWN_DEFAULTS = {DPOModule: {"learning_rate": 1e-6}}
"""Shared arguments an objective declares again, for its own default."""
ROLES = {"policy": {"path": "p"}, "weak_base": {"path": "wb"}, "weak_aligned": {"path": "wa"}}


def _cli_arguments(cls: type) -> dict[str, tuple[str, object, str | None]]:
    """`--model.X` of `cls` as LightningCLI's parser sees them: X -> (type, default, help)."""
    parser = ArgumentParser()
    parser.add_class_arguments(cls, "model")
    return {
        a.dest.removeprefix("model."): (repr(getattr(a, "_typehint", None)), a.default, a.help)
        for a in parser._actions
        if a.dest.startswith("model.")
    }


@pytest.mark.parametrize("cls", [WSPOModule, DPOModule, SFTModule], ids=lambda c: c.__name__)
def test_every_objective_lists_every_shared_argument_with_the_bases_type_default_and_help(cls):
    base, objective = _cli_arguments(PreferenceModule), _cli_arguments(cls)
    shared = [key for key in base if key.split(".")[0] in SHARED]
    assert {key.split(".")[0] for key in shared} == set(SHARED)
    for key in shared:
        assert key in objective, key
        type_, default, help_ = base[key]
        default = OWN_DEFAULTS.get(cls, {}).get(key, default)
        assert objective[key] == (type_, default, help_), key


@pytest.mark.parametrize("cls", [WSPOModule, DPOModule], ids=lambda c: c.__name__)
def test_an_objective_declares_only_its_own_arguments_and_passes_the_shared_ones_on(cls):
    own = inspect.signature(cls.__init__).parameters
    assert inspect.Parameter.VAR_KEYWORD in {p.kind for p in own.values()}
    assert set(own) & set(SHARED) == {"policy", "reference", *OWN_DEFAULTS.get(cls, {})}
    for name, default in OWN_DEFAULTS.get(cls, {}).items():
        assert own[name].default == default != inspect.signature(PreferenceModule.__init__).parameters[name].default


def test_saved_hyperparameters_hold_every_argument_as_given():
    shared = {
        "reference": {"path": "r"},
        "learning_rate": 3e-4,
        "weight_decay": 0.01,
        "warmup_ratio": 0.2,
        "freeze_embeddings": True,
        "disable_dropout": False,
        "cache_dir": "cache",
        "optimizer": torch.optim.SGD,
        "lr_scheduler": torch.optim.lr_scheduler.ConstantLR,
    }
    wspo = WSPOModule(**ROLES, gamma=2.0, train_on_rejected=True, weak_tokenization="own", **shared)
    assert dict(wspo.hparams) == {
        **ROLES,
        **shared,
        "gamma": 2.0,
        "train_on_rejected": True,
        "weak_tokenization": "own",
    }
    assert wspo.gamma == 2.0 and wspo.optimizer_callable is torch.optim.SGD
    dpo = DPOModule(policy=ROLES["policy"], beta=0.3, **shared)
    assert dict(dpo.hparams) == {
        "policy": ROLES["policy"],
        **shared,
        "beta": 0.3,
        "label_smoothing": None,
        "loss": None,
    }
    assert dpo.pair_loss.beta == 0.3


def test_defaults_are_the_bases_but_where_an_objective_states_its_own():
    base = inspect.signature(PreferenceModule.__init__).parameters
    expected = {name: p.default for name, p in base.items() if name not in ("self", "policy")}
    assert {k: v for k, v in WSPOModule(**ROLES).hparams.items() if k in expected} == expected
    assert {k: v for k, v in SFTModule(policy=ROLES["policy"]).hparams.items() if k in expected} == expected
    dpo = {k: v for k, v in DPOModule(policy=ROLES["policy"]).hparams.items() if k in expected}
    assert dpo == {**expected, "learning_rate": 1e-6}
