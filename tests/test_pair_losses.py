"""The pair losses of `wspo_lightning.losses` (DPO family) against TRL's losses of the same names, on per-token
log-probs of multi-token responses whose chosen and rejected lengths differ (a sum cannot pass for a mean);
hand-worked numbers; and DPOModule's `loss` from YAML and the command line."""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
import yaml
from helpers import metrics, tiny_config
from torch.testing import assert_close

from wspo_lightning.cli import main as wspo_main
from wspo_lightning.lightning_cli import run_cli
from wspo_lightning.losses import DPOLoss, HingeLoss, IPOLoss, PairLoss, RobustDPOLoss, reward_margin

LN2 = math.log(2.0)
CHOSEN_LENGTHS, REJECTED_LENGTHS = (3, 5, 1, 4), (6, 2, 4, 1)  # every pair's two lengths differ


def _side(lengths: tuple[int, ...], g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(policy, reference, mask) [batch, tokens] of one side: row i has i prompt tokens, then its response, then
    padding. Masked positions hold +-inf, which must never reach a result (inf * 0 would be nan)."""
    width = max(i + n for i, n in enumerate(lengths))
    mask = torch.zeros(len(lengths), width, dtype=torch.bool)
    for i, n in enumerate(lengths):
        mask[i, i : i + n] = True
    garbage = torch.randn(len(lengths), width, generator=g).sign() * math.inf
    policy, reference = (torch.where(mask, -torch.rand(mask.shape, generator=g) * 5, garbage) for _ in range(2))
    return policy, reference, mask


def _random_pairs(seed: int = 0) -> dict[str, torch.Tensor]:
    """The arguments of `PairLoss.forward` for 4 pairs of unequal lengths (CHOSEN_LENGTHS, REJECTED_LENGTHS)."""
    g = torch.Generator().manual_seed(seed)
    pc, rc, cm = _side(CHOSEN_LENGTHS, g)
    pr, rr, rm = _side(REJECTED_LENGTHS, g)
    return dict(
        policy_chosen_logps=pc,
        policy_rejected_logps=pr,
        reference_chosen_logps=rc,
        reference_rejected_logps=rr,
        chosen_mask=cm,
        rejected_mask=rm,
    )


def _trl_compute_loss(loss_types, loss_weights, beta, label_smoothing, pairs):
    """Run TRL's own ``DPOTrainer._compute_loss`` (TRL 1.x) unbound on a minimal stand-in trainer.

    TRL's batch is [chosen..., rejected...], each row a prompt token then the completion padded to one width,
    `completion_mask` marking the completion. The stand-in model returns the policy's per-token log-probs,
    zero where the label is -100 (as TRL's fused LM head does); the reference's sequence sums come in as
    precomputed (``precompute_ref_logps``), summed here over the masks. Returns (loss, eval metrics)."""
    import trl.trainer.dpo_trainer as trl_dpo  # the dev extra pins TRL 1.x, where this method exists

    masks = (pairs["chosen_mask"], pairs["rejected_mask"])
    width = max(m.shape[1] for m in masks)

    def pad(t):  # [B, T] -> [B, width]
        return F.pad(t, (0, width - t.shape[1]))

    per_token = torch.cat([pad(pairs["policy_chosen_logps"]), pad(pairs["policy_rejected_logps"])])
    completion_mask = F.pad(torch.cat([pad(m.long()) for m in masks]), (1, 0))  # [2B, 1 + width]
    rows = per_token.shape[0]

    class StandInModel:
        training = False  # -> TRL logs under "eval" and leaves its train token counter alone

        def __call__(self, labels, **kwargs):
            zeros = torch.zeros(rows, width)
            log_probs = torch.where(labels[:, 1:] != -100, per_token, 0.0)  # the next token's, per position
            return SimpleNamespace(log_probs=log_probs, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())

    model = StandInModel()
    identity = lambda t: t  # noqa: E731  single process: gathering is the identity
    trainer = SimpleNamespace(
        model=model,
        accelerator=SimpleNamespace(device=torch.device("cpu"), gather=identity, gather_for_metrics=identity),
        aux_loss_enabled=False,
        precompute_ref_logps=True,
        ld_alpha=None,
        f_divergence_type="reverse_kl",
        loss_types=loss_types,
        loss_weights=loss_weights,
        beta=beta,
        label_smoothing=label_smoothing,
        use_weighting=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    reference_sums = [
        (torch.where(pairs[f"{side}_mask"], pairs[f"reference_{side}_logps"], 0.0)).sum(dim=1)
        for side in ("chosen", "rejected")
    ]
    inputs = {
        "input_ids": torch.zeros(rows, 1 + width, dtype=torch.long),
        "attention_mask": torch.ones(rows, 1 + width, dtype=torch.long),
        "completion_mask": completion_mask,
        "ref_chosen_logps": reference_sums[0],
        "ref_rejected_logps": reference_sums[1],
    }
    loss = trl_dpo.DPOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)
    return loss, trainer._metrics["eval"]


def _assert_metrics_match_trl(pairs, chosen, rejected, trl_metrics):
    """TRL logs batch means: rewards/chosen, rewards/rejected; the margin and accuracy of reward_margin; and the
    policy's sequence sums as logps/chosen, logps/rejected (DPOModule logs the same from the same values)."""
    margin, correct = reward_margin(chosen, rejected)
    sums = {
        side: torch.where(pairs[f"{side}_mask"], pairs[f"policy_{side}_logps"], 0.0).sum(1)
        for side in ("chosen", "rejected")
    }
    ours = {
        "rewards/chosen": chosen.mean(),
        "rewards/rejected": rejected.mean(),
        "rewards/margins": margin.mean(),
        "rewards/accuracies": correct.mean(),
        "logps/chosen": sums["chosen"].mean(),
        "logps/rejected": sums["rejected"].mean(),
    }
    for name, value in ours.items():
        assert trl_metrics[name] == pytest.approx([value.item()], rel=1e-5), name


SAME_NAMES = {  # our loss: (TRL's loss_type, the label_smoothing TRL reads)
    "sigmoid": (DPOLoss(beta=0.3), 0.0),
    "robust": (RobustDPOLoss(beta=0.3, label_smoothing=0.2), 0.2),
    "hinge": (HingeLoss(beta=0.3), 0.0),
    "ipo": (IPOLoss(beta=0.3), 0.0),
}


@pytest.mark.parametrize("loss_type", list(SAME_NAMES))
def test_pair_loss_and_its_logged_metrics_equal_trls_loss_of_the_same_name(loss_type):
    """Random per-token log-probs, 4 pairs of unequal lengths, garbage at masked positions. Our mean loss equals
    TRL's loss; our rewards beta * (S_pol - S_ref) (sums, for IPO too) give TRL's logged metrics."""
    loss, label_smoothing = SAME_NAMES[loss_type]
    pairs = _random_pairs(seed=len(loss_type))
    trl_loss, trl_metrics = _trl_compute_loss([loss_type], [1.0], 0.3, label_smoothing, pairs)
    losses, chosen, rejected = loss(**pairs)
    assert losses.shape == chosen.shape == rejected.shape == (4,)
    assert_close(losses.mean(), trl_loss)
    _assert_metrics_match_trl(pairs, chosen, rejected, trl_metrics)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_sft_weight_adds_trls_sft_loss_at_that_weight(loss_type):
    """TRL's loss_type=[loss_type, "sft"], loss_weights=[1, 0.7]: the pair loss's mean plus 0.7 times the mean
    NLL of all chosen tokens of the batch (13 tokens here, over 4 chosen responses of 1 to 5 tokens)."""
    loss = SAME_NAMES[loss_type][0]
    with_sft = type(loss)(beta=0.3, sft_weight=0.7)
    pairs = _random_pairs(seed=11)
    trl_loss, trl_metrics = _trl_compute_loss([loss_type, "sft"], [1.0, 0.7], 0.3, 0.0, pairs)
    losses, chosen, rejected = with_sft(**pairs)
    assert_close(losses.mean(), trl_loss)
    _assert_metrics_match_trl(pairs, chosen, rejected, trl_metrics)
    nll = -pairs["policy_chosen_logps"][pairs["chosen_mask"]].mean()
    assert_close(losses - loss(**pairs)[0], (0.7 * nll).expand(4))  # the same batch term in every pair's loss


def test_dpo_label_smoothing_matches_trl_cdpo_formula():
    """TRL 1.x dropped label smoothing from 'sigmoid'; its cDPO expression
    -logsigmoid(beta*d)*(1-ls) - logsigmoid(-beta*d)*ls survives in 'aot_unpaired', where d is the difference
    of the batch-sorted chosen and rejected log-ratios. With one pair per call the sort is the identity and
    d = h, so each single-pair call must equal our per-pair loss."""
    pairs = _random_pairs(seed=8)
    losses, _, _ = DPOLoss(beta=0.2, label_smoothing=0.15)(**pairs)
    for i in range(4):
        trl_loss, _ = _trl_compute_loss(["aot_unpaired"], [1.0], 0.2, 0.15, {k: v[i : i + 1] for k, v in pairs.items()})
        assert_close(losses[i], trl_loss)


# ---------------------------------------------------------------- hand-worked numbers (one token per response)


def _one_token(*sums: list[float]) -> tuple[torch.Tensor, ...]:
    """Responses of one token each, so the sequence sums are the given numbers; masks all True."""
    logps = [torch.tensor(s).unsqueeze(1) for s in sums]
    mask = torch.ones(len(sums[0]), 1, dtype=torch.bool)
    return (*logps, mask, mask)


# h = (pc - pr) - (rc - rr): pair 0 (-0.4) - (-0.4) = 0, pair 1 20 - 10 = 10, pair 2 20 - 0 = 20.
WORKED = _one_token([-0.5, -10.0, -1.0], [-0.1, -30.0, -21.0], [-0.5, -15.0, -3.0], [-0.1, -25.0, -3.0])


def test_dpo_loss_matches_hand_worked_example():
    """h = [0, 10, 20] -> beta = 0.1 scales to x = [0, 1, 2] -> loss = -log sigmoid(x) = log(1 + e^-x)
    = [ln 2, ln(1 + e^-1), ln(1 + e^-2)] = [0.6931, 0.3133, 0.1269].
    chosen_rewards = 0.1 * (pc - rc) = 0.1 * [0, 5, 2] = [0, 0.5, 0.2];
    rejected_rewards = 0.1 * (pr - rr) = 0.1 * [0, -5, -18] = [0, -0.5, -1.8]."""
    losses, chosen, rejected = DPOLoss(beta=0.1)(*WORKED)
    assert_close(losses, torch.tensor([LN2, math.log1p(math.exp(-1)), math.log1p(math.exp(-2))]))
    assert_close(chosen, torch.tensor([0.0, 0.5, 0.2]))
    assert_close(rejected, torch.tensor([0.0, -0.5, -1.8]))


def test_dpo_label_smoothing_adds_ls_times_scaled_logit():
    """ls = 0.1: loss = 0.9 log(1 + e^-x) + 0.1 log(1 + e^x), and log(1 + e^x) = x + log(1 + e^-x),
    so loss = log(1 + e^-x) + 0.1 x: x = [0, 1, 2] -> [0.6931, 0.3133 + 0.1, 0.1269 + 0.2]."""
    losses, _, _ = DPOLoss(beta=0.1, label_smoothing=0.1)(*WORKED)
    assert_close(losses, torch.tensor([LN2, math.log1p(math.exp(-1)) + 0.1, math.log1p(math.exp(-2)) + 0.2]))


@pytest.mark.parametrize("loss", list(v[0] for v in SAME_NAMES.values()), ids=list(SAME_NAMES))
def test_pair_loss_gradient_reaches_the_policy_and_rewards_are_detached(loss):
    pairs = _random_pairs(seed=3)
    pairs["policy_chosen_logps"].requires_grad_(True)
    losses, chosen, rejected = loss(**pairs)
    losses.sum().backward()
    assert not chosen.requires_grad and not rejected.requires_grad
    grad = pairs["policy_chosen_logps"].grad
    assert (grad[~pairs["chosen_mask"]] == 0).all() and grad.isfinite().all()


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: DPOLoss(label_smoothing=0.5), r"DPOLoss.label_smoothing must lie in \[0, 0.5\), got 0.5"),
        (lambda: RobustDPOLoss(label_smoothing=-0.1), r"RobustDPOLoss.label_smoothing must lie in \[0, 0.5\)"),
        (lambda: IPOLoss(beta=0.0), "IPOLoss.beta must be a finite positive number, got 0.0"),
        (lambda: HingeLoss(beta=math.inf), "HingeLoss.beta must be a finite positive number, got inf"),
        (lambda: DPOLoss(beta=math.nan), "DPOLoss.beta must be a finite positive number, got nan"),
        (lambda: IPOLoss(sft_weight=-1.0), "IPOLoss.sft_weight must be a finite number >= 0, got -1.0"),
    ],
)
def test_pair_loss_rejects_bad_hyperparameters_naming_them(build, message):
    with pytest.raises(ValueError, match=message):
        build()


# ---------------------------------------------------------------- DPOModule's `loss` from the config


def _dpo_config(world, tmp_path, **model) -> str:
    """configs/tiny_cpu.yaml turned into a DPO config with these extra model init_args (and no GammaSchedule:
    DPO has no gamma), written as YAML."""
    config = yaml.safe_load(tiny_config(world, tmp_path / "run").read_text())
    callbacks = config["trainer"]["callbacks"]
    config["trainer"]["callbacks"] = [c for c in callbacks if not c["class_path"].endswith("GammaSchedule")]
    config["model"] = {
        "class_path": "wspo_lightning.module.DPOModule",
        "init_args": {"policy": {"path": str(world / "policy")}, "learning_rate": 0.003, **model},
    }
    path = tmp_path / "dpo.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return str(path)


def test_a_loss_block_in_yaml_builds_that_loss_and_flags_override_it(tiny_world, tmp_path):
    block = {"class_path": "wspo_lightning.losses.IPOLoss", "init_args": {"beta": 0.5}}
    config = _dpo_config(tiny_world, tmp_path, loss=block)
    loss = run_cli(["--config", config], run=False).model.pair_loss
    assert type(loss) is IPOLoss and (loss.beta, loss.sft_weight) == (0.5, 0.0)
    flags = ["--model.init_args.loss=wspo_lightning.losses.HingeLoss", "--model.init_args.loss.sft_weight=0.25"]
    loss = run_cli(["--config", _dpo_config(tiny_world, tmp_path), *flags], run=False).model.pair_loss
    assert type(loss) is HingeLoss and (loss.beta, loss.sft_weight) == (0.1, 0.25)


def test_beta_and_label_smoothing_are_shorthand_for_dpo_loss(tiny_world, tmp_path):
    config = _dpo_config(tiny_world, tmp_path)
    default = run_cli(["--config", config], run=False).model.pair_loss
    assert type(default) is DPOLoss and (default.beta, default.label_smoothing) == (0.1, 0.0)
    given = run_cli(["--config", config, "--model.beta=0.5", "--model.label_smoothing=0.1"], run=False).model
    assert type(given.pair_loss) is DPOLoss and (given.pair_loss.beta, given.pair_loss.label_smoothing) == (0.5, 0.1)
    assert isinstance(given.pair_loss, PairLoss)


def test_giving_beta_and_a_loss_is_one_line_error(tiny_world, tmp_path, capsys):
    config = _dpo_config(tiny_world, tmp_path, beta=0.1)
    assert wspo_main(["fit", "--config", config, "--model.init_args.loss=wspo_lightning.losses.IPOLoss"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("wspo:")]
    assert lines == [
        "wspo: error: model.beta and model.loss are both given: the loss owns its hyperparameters, so set them "
        "in model.loss's init_args and leave model.beta unset"
    ]


def test_a_bad_value_inside_a_loss_block_is_one_line_error(tiny_world, tmp_path, capsys):
    block = {"class_path": "wspo_lightning.losses.IPOLoss", "init_args": {"beta": 0.0}}
    assert wspo_main(["fit", "--config", _dpo_config(tiny_world, tmp_path, loss=block)]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("wspo:")]
    assert lines == ["wspo: error: config: IPOLoss.beta must be a finite positive number, got 0.0"]


def test_fit_with_a_loss_block_trains_on_it_and_names_it_in_the_model_card(tiny_world, tmp_path):
    """Two steps of IPO + SFT through `wspo fit`: the TRL metric names are logged and finite, and the exported
    model card names the loss with its hyperparameters."""
    block = {"class_path": "wspo_lightning.losses.IPOLoss", "init_args": {"beta": 0.5, "sft_weight": 0.1}}
    config = _dpo_config(tiny_world, tmp_path, loss=block)
    cli = run_cli(["fit", "--config", config, "--trainer.max_steps=2", "--trainer.limit_val_batches=1"])
    logged = metrics(cli)
    for name in ("loss", "rewards/margins", "rewards/accuracies", "logps/chosen"):
        assert len(logged[f"train/{name}"]) == 2 and all(map(math.isfinite, logged[f"train/{name}"])), name
    card = (tmp_path / "run" / "export" / "README.md").read_text()
    assert "| loss | `IPOLoss(beta=0.5, sft_weight=0.1)` |" in card


def test_a_loss_given_in_python_is_kept_in_hparams_as_its_yaml_block(tmp_path):
    """As under LightningCLI: the block that rebuilds it, so a checkpoint's hparams load with weights_only."""
    from wspo_lightning.module import DPOModule

    module = DPOModule(policy={"path": str(tmp_path / "unused")}, loss=RobustDPOLoss(beta=0.2, label_smoothing=0.1))
    block = {
        "class_path": "wspo_lightning.losses.RobustDPOLoss",
        "init_args": {"beta": 0.2, "label_smoothing": 0.1, "sft_weight": 0.0},
    }
    assert module.hparams.loss == block and type(module.pair_loss) is RobustDPOLoss
    torch.save({"hyper_parameters": dict(module.hparams)}, tmp_path / "hparams.pt")
    assert torch.load(tmp_path / "hparams.pt", weights_only=True)["hyper_parameters"]["loss"] == block
