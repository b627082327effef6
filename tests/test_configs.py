"""Every accelerate_configs/*.yaml parses with Accelerate's own loader and says what its name promises."""

import argparse
import os
from pathlib import Path

import pytest
import torch.distributed.run as distrib_run
from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
from accelerate.commands.launch import launch_command, launch_command_parser
from accelerate.utils import DistributedType

CONFIG_DIR = Path(__file__).resolve().parents[1] / "accelerate_configs"
# name -> (distributed type, total processes, machines, mixed precision, use_cpu)
EXPECTED = {
    "1gpu.yaml": (DistributedType.MULTI_GPU, 1, 1, "no", False),
    "1gpu_fp16.yaml": (DistributedType.MULTI_GPU, 1, 1, "fp16", False),
    "1gpu_bf16.yaml": (DistributedType.MULTI_GPU, 1, 1, "bf16", False),
    "8gpu.yaml": (DistributedType.MULTI_GPU, 8, 1, "no", False),
    "8gpu_fp16.yaml": (DistributedType.MULTI_GPU, 8, 1, "fp16", False),
    "8gpu_bf16.yaml": (DistributedType.MULTI_GPU, 8, 1, "bf16", False),
    "2node_8gpu.yaml": (DistributedType.MULTI_GPU, 16, 2, "fp16", False),
    "cpu.yaml": (DistributedType.MULTI_GPU, 1, 1, "no", True),  # 1 process: torchrun launches it (signals)
    # torchrun launcher + ACCELERATE_USE_CPU=1 (see the file's header for why not MULTI_CPU)
    "cpu_2proc.yaml": (DistributedType.MULTI_GPU, 2, 1, "no", True),
    "cpu_2node.yaml": (DistributedType.MULTI_GPU, 2, 2, "no", True),  # 2 "machines" x 1 CPU process, localhost
}


def test_the_expected_set_of_configs_exists():
    assert sorted(p.name for p in CONFIG_DIR.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_parses_with_accelerate_and_matches_its_name(name):
    config = load_config_from_file(str(CONFIG_DIR / name))
    assert isinstance(config, ClusterConfig)
    distributed_type, num_processes, num_machines, mixed_precision, use_cpu = EXPECTED[name]
    assert config.distributed_type == distributed_type
    assert config.num_processes == num_processes
    assert config.num_machines == num_machines
    assert config.mixed_precision == mixed_precision
    assert config.use_cpu is use_cpu
    assert config.dynamo_config == {}  # --compile is the script's flag; a config must not compile behind its back


def test_every_config_documents_its_launch_command():
    for name in EXPECTED:
        header = (CONFIG_DIR / name).read_text().split("compute_environment")[0]
        assert "accelerate launch --config_file accelerate_configs/" + name in header, name


def test_two_node_example_has_documented_placeholders():
    text = (CONFIG_DIR / "2node_8gpu.yaml").read_text()
    config = load_config_from_file(str(CONFIG_DIR / "2node_8gpu.yaml"))
    assert config.main_process_ip == "REPLACE_WITH_MAIN_NODE_IP" and config.machine_rank == 0
    assert "machine_rank" in text.split("compute_environment")[0]
    assert "main_process_ip" in text.split("compute_environment")[0]


def test_cpu_two_node_config_meets_on_localhost_with_one_process_per_machine():
    config = load_config_from_file(str(CONFIG_DIR / "cpu_2node.yaml"))
    assert config.main_process_ip == "127.0.0.1" and isinstance(config.main_process_port, int)
    assert config.num_processes // config.num_machines == 1 and config.machine_rank == 0
    assert "ACCELERATE_USE_CPU=1" in (CONFIG_DIR / "cpu_2node.yaml").read_text().split("compute_environment")[0]


def test_single_process_configs_use_the_launcher_that_forwards_signals():
    # MULTI_GPU with one process: torchrun as the launcher (it forwards SIGTERM/SIGUSR1 and waits for the save)
    for name, (_, num_processes, *_) in EXPECTED.items():
        if num_processes == 1:
            assert load_config_from_file(str(CONFIG_DIR / name)).distributed_type == DistributedType.MULTI_GPU, name


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_config_asks_torchrun_to_forward_sigusr1_and_wait_for_the_save(name):
    # mpirun_config's keys reach torchrun as --signals_to_handle / --shutdown_timeout (tests/test_reliability.py and
    # tests/test_train_faults.py check it end to end with cpu_2proc.yaml and cpu.yaml)
    config = load_config_from_file(str(CONFIG_DIR / name))
    assert "SIGUSR1" in config.mpirun_config["signals_to_handle"].split(",")
    assert "SIGTERM" in config.mpirun_config["signals_to_handle"].split(",")
    assert config.mpirun_config["shutdown_timeout"] >= 60


def torchrun_args(monkeypatch, name: str) -> argparse.Namespace:
    """What `accelerate launch --config_file accelerate_configs/NAME script.py` hands torchrun's run(): Accelerate's own
    launch code path, stopped where torchrun would start the workers."""
    captured = []
    monkeypatch.setattr(distrib_run, "run", captured.append)
    for variable in [v for v in os.environ if v.startswith(("PET_", "TORCH_ELASTIC_", "ACCELERATE_"))]:
        monkeypatch.delenv(variable)  # the config alone decides
    launch_command(launch_command_parser().parse_args(["--config_file", str(CONFIG_DIR / name), "train.py"]))
    assert len(captured) == 1, name
    return captured[0]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_the_launch_hands_torchrun_the_signal_settings(monkeypatch, name):
    args = torchrun_args(monkeypatch, name)
    assert args.signals_to_handle == "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
    assert args.shutdown_timeout == 300
    assert int(args.nproc_per_node) * EXPECTED[name][2] == EXPECTED[name][1] and args.training_script == "train.py"


def older_torchrun_parser(*missing: str):
    """torchrun's parser as an older torch has it: without the options `missing` (dest names). torch 2.11 (measured
    on the GPU image): --signals_to_handle exists, `torchrun --shutdown_timeout 300 ...` is an unrecognized argument."""
    newest = distrib_run.get_args_parser

    def get_args_parser() -> argparse.ArgumentParser:
        parser = newest()
        for action in [a for a in parser._actions if a.dest in missing]:
            parser._remove_action(action)
            for option in action.option_strings:
                del parser._option_string_actions[option]
        return parser

    return get_args_parser


@pytest.mark.parametrize("missing", [("shutdown_timeout",), ("shutdown_timeout", "signals_to_handle")],
                         ids=["torch-2.11", "older"])
def test_an_older_torchrun_still_launches_every_config(monkeypatch, missing):
    older = older_torchrun_parser(*missing)
    with pytest.raises(SystemExit):  # the simulated torchrun rejects the option on its command line, as 2.11 does
        older().parse_args([f"--{missing[0]}", "300", "train.py"])
    monkeypatch.setattr(distrib_run, "get_args_parser", older)
    known = {action.dest for action in older()._actions}
    for name in EXPECTED:
        args = torchrun_args(monkeypatch, name)
        # only options this torchrun knows reach it: the launch goes on without the missing ones
        assert set(vars(args)) <= known and not set(missing) & set(vars(args)), name


def test_one_machine_configs_take_a_free_port():
    # torchrun listens on main_process_port: a fixed one (29500) would make two jobs on one machine (two demos, two
    # single-GPU runs) collide; 0 makes Accelerate pick a free one. Two machines must agree on one: a fixed port.
    for name, (_, _, num_machines, *_) in EXPECTED.items():
        port = load_config_from_file(str(CONFIG_DIR / name)).main_process_port
        assert port == 0 if num_machines == 1 else port > 0, name
