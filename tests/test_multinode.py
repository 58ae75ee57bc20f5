"""Several nodes without a cluster: two "nodes" of one process each on this machine (gloo over 127.0.0.1),
launched the two ways configs/strategies/README.md gives: `srun` (here: the environment variables srun sets for
each task, which Lightning's SLURMEnvironment reads) and `torchrun` with a c10d rendezvous on node 0.

Two ranks x batch 8 see the 16 training records of `world16` per step as one process x batch 16 does, so the
per-step losses must be the single process's (see test_strategies.py)."""

from __future__ import annotations

import sys

from helpers import (
    ROOT,
    STEPS,
    assert_curves_match,
    assert_frozen_roles_sharded,
    csv_metrics,
    free_port,
    launch_all,
    strategy_config,
    wspo,
)

NODE = [
    "--config",
    str(ROOT / "configs" / "strategies" / "fsdp2.yaml"),
    "--config",
    str(ROOT / "configs" / "strategies" / "multi_node.yaml"),
    "--trainer.accelerator=cpu",  # multi_node.yaml asks for 8 GPUs per node: here 1 CPU process per "node"
    "--trainer.devices=1",
    "--data.batch_size=8",
    *STEPS,
]


def srun_environment(task: int, tasks: int, port: int) -> dict[str, str]:
    """What `srun --nodes=TASKS --ntasks-per-node=1` sets for one task, the node list on loopback. Lightning takes
    the main address from SLURM_NODELIST and the port from the last 4 digits of SLURM_JOB_ID (+ 15000)."""
    return {
        "SLURM_JOB_ID": f"7{port - 15000:04d}",
        "SLURM_JOB_NAME": "wspo",
        "SLURM_NTASKS": str(tasks),
        "SLURM_NTASKS_PER_NODE": "1",
        "SLURM_NNODES": str(tasks),
        "SLURM_NODELIST": "127.0.0.1",
        "SLURM_PROCID": str(task),
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": str(task),
    }


def torchrun_node(port: int, *args: str) -> list[str]:
    """The README's torchrun line for one of 2 nodes; node 0 (whichever joins first) hosts the rendezvous."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=2",
        "--nproc_per_node=1",
        "--rdzv_id=wspo",
        "--rdzv_backend=c10d",
        f"--rdzv_endpoint=127.0.0.1:{port}",
        "--local-addr=127.0.0.1",  # the address node 0 gives its workers: loopback, not the host name
        "-m",
        "wspo_lightning.cli",
        *args,
    ]


def test_two_nodes_under_srun_train_and_save_then_resume_under_torchrun(world16, single16, tmp_path):
    """srun: 2 nodes train 4 steps with FSDP2, a sharded checkpoint at step 2 (one file per rank). torchrun:
    2 nodes resume from it, the frozen roles sharded and offloaded to CPU memory, and redo steps 3-4 exactly."""
    full, resumed = tmp_path / "srun", tmp_path / "torchrun"
    config = strategy_config(world16, full, checkpoint_every=2, fsdp2=True)
    port = free_port(15000, 25000)
    logs = launch_all([(wspo("fit", "--config", str(config), *NODE), srun_environment(t, 2, port)) for t in (0, 1)])
    for task, log in enumerate(logs):  # each process took its rank from SLURM_PROCID
        assert f"Initializing distributed: GLOBAL_RANK: {task}, MEMBER: {task + 1}/2" in log
    checkpoint = full / "ckpt" / "step=2.ckpt"
    assert checkpoint.is_dir() and len(list(checkpoint.glob("*.distcp"))) == 2
    full_metrics = csv_metrics(full)
    assert_curves_match(full_metrics, single16[0])

    config = strategy_config(world16, resumed, fsdp2=True)
    port = free_port()
    offload = "--trainer.strategy.frozen_roles=offload"  # the frozen roles' shards in CPU memory
    command = torchrun_node(port, "fit", "--config", str(config), *NODE, offload, f"--ckpt_path={checkpoint}")
    logs = launch_all([(command, {}), (command, {})])
    assert_frozen_roles_sharded("".join(logs))
    ranks = [{line.split("GLOBAL_RANK: ")[1][0] for line in log.splitlines() if "GLOBAL_RANK" in line} for log in logs]
    assert sorted(rank for found in ranks for rank in found) == ["0", "1"]  # the rendezvous gave one rank each
    resumed_metrics = csv_metrics(resumed)
    assert resumed_metrics["step"][0] == 2  # it went on from step 2
    assert_curves_match(resumed_metrics, {k: v[2:] for k, v in full_metrics.items()}, ["train/loss"], rtol=1e-6)
