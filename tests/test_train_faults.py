"""Faults and bad inputs of issue 15 (training side), through scripts/train.py's main, its parser or its launcher:
the single-process launcher under SIGTERM/SIGUSR1, a signal during the imports, two runs into one folder, an edited
manifest, writers' own full-disk exceptions, a bad file met by the evaluation, non-finite best/final weights,
argument values, a torn train_log.jsonl, a malicious RNG state file, unwritable outputs. Synthetic data, CPU.
"""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from modeling import checkpointing, reliability
from modeling.run_files import LOCK_FILE, OutputDirLock

# the helpers of the existing end-to-end tests (tiny runs, in-process main, waiting on train_log.jsonl)
from tests.test_reliability import TINY, complete_checkpoints, log_lines, malicious, resign, run_main, wait_until

REPO = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = REPO / "scripts" / "train.py"


@pytest.fixture(scope="module")
def train(load_script):
    return load_script("train")


def worker_pids(out: Path) -> list[int]:
    """Training processes (not launchers) writing into `out`: a RANK in their environment."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if str(out) in (proc / "cmdline").read_text() and "\0RANK=" in "\0" + (proc / "environ").read_text():
                pids.append(int(proc.name))
        except (OSError, ValueError):
            continue
    return pids


def alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().split(") ")[1][0] != "Z"
    except OSError:
        return False


# -------------------------------------------------------------------------------------------- launcher signals
@pytest.mark.slow
@pytest.mark.parametrize("signum, target", [(signal.SIGTERM, "launcher"), (signal.SIGTERM, "group"),
                                            (signal.SIGUSR1, "launcher")], ids=["SIGTERM-launcher", "SIGTERM-group",
                                                                                 "SIGUSR1-launcher"])
def test_the_single_process_launcher_waits_for_the_save_and_leaves_no_orphan(synthetic_root, tmp_path, signum,
                                                                             target):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(REPO / "accelerate_configs" / "cpu.yaml"), "--main_process_port", "0", str(TRAIN_SCRIPT), *TINY,
               "--data_root", str(synthetic_root), "--max_iters", "200", "--output_dir", str(out)]
    log = tmp_path / "log"
    with open(log, "w") as f:
        launcher = subprocess.Popen(command, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                                    env={**os.environ, "OMP_NUM_THREADS": "1"})
    wait_until(lambda: any("loss" in r for r in log_lines(out)), lambda: launcher.poll() is None, "an iteration")
    workers = worker_pids(out)
    assert len(workers) == 1, workers
    if target == "group":
        os.killpg(launcher.pid, signum)
    else:
        launcher.send_signal(signum)
    launcher.wait(240)
    marker_at_exit = (out / reliability.PREEMPTED_MARKER).exists()  # what a job script sees right away
    text = log.read_text()
    assert marker_at_exit, text[-3000:]
    assert not alive(workers[0]), "the training process outlived its launcher"
    marker = json.loads((out / reliability.PREEMPTED_MARKER).read_text())
    assert marker["signal"] == signal.Signals(signum).name and marker["iteration"] < 200
    assert f"{marker['signal']}: stopped after iteration {marker['iteration']}" in text
    assert Path(marker["checkpoint"]) == complete_checkpoints(out)[-1]


@pytest.mark.slow
def test_a_signal_during_the_imports_is_held_until_the_handlers_are_installed(synthetic_root, tmp_path):
    # sent 0.3 s after the start, while Python imports torch & co: with the default action it would kill the process
    out = tmp_path / "early"
    process = subprocess.Popen([sys.executable, str(TRAIN_SCRIPT), *TINY, "--data_root", str(synthetic_root),
                                "--max_iters", "50", "--output_dir", str(out)], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    time.sleep(0.3)
    process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=240)[0]
    assert process.returncode == reliability.EXIT_PREEMPTED, output[-3000:]
    assert json.loads((out / reliability.PREEMPTED_MARKER).read_text())["iteration"] == 1  # --check_interval 1


# -------------------------------------------------------------------------------------------------- one writer
HOLD = "import sys, time; from modeling.run_files import OutputDirLock; OutputDirLock(sys.argv[1]).acquire(); " \
       "print('locked', flush=True); time.sleep(600)"


def test_a_second_run_into_the_same_output_dir_is_refused_and_a_killed_holder_leaves_no_lock(train, tmp_path):
    out = tmp_path / "busy"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(SystemExit) as stop:
            run_main(train, [*TINY, "--max_iters", "1", "--output_dir", str(out)])
        message = str(stop.value.code)
        assert message.startswith(f"error: {out} is in use by another training run (pid {holder.pid} on "), message
        assert "started 20" in message and "\n" not in message
        assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]  # nothing else written
    finally:
        holder.kill()  # SIGKILL: the kernel drops the lock
        holder.wait()
    with OutputDirLock(out) as lock:
        assert lock.warning is None


@pytest.mark.parametrize("code", [errno.ENOSYS, errno.EOPNOTSUPP])
def test_an_output_dir_on_a_filesystem_without_flock_is_a_warning(tmp_path, monkeypatch, capsys, code):
    # Lustre without `flock`, NFS without lockd: the run goes on, saying that nothing keeps a second run out
    from data import locking
    from modeling.run_files import claimed_output_dir

    def refuse(fd, operation):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(locking.fcntl, "flock", refuse)
    monkeypatch.delenv("RANK", raising=False)  # the main process takes the lock
    with claimed_output_dir(tmp_path / "out"):
        pass
    assert capsys.readouterr().out == (f"warning: cannot lock {tmp_path / 'out' / LOCK_FILE} ({os.strerror(code)}: "
                                       "the filesystem does not support flock); nothing keeps a second run out of "
                                       "this folder\n")


def test_an_unwritable_output_dir_is_one_line(train, tmp_path, monkeypatch):
    from modeling import run_files

    real_open = os.open

    def read_only(path, flags, *args):
        if str(path).endswith(LOCK_FILE):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(run_files.os, "open", read_only)
    with pytest.raises(SystemExit, match=rf"^error: --output_dir {tmp_path}: cannot write there \(\[Errno 30\] "
                                         "Read-only file system"):
        run_main(train, [*TINY, "--max_iters", "1", "--output_dir", str(tmp_path)])


# ------------------------------------------------------------------------------ manifest, torn log, RNG states
def resign_manifest(path: Path, **changes) -> None:
    manifest = json.loads((path / "manifest.json").read_text())
    manifest.update(changes)
    manifest["manifest_sha256"] = checkpointing.manifest_checksum(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest))


def test_edited_manifests_torn_log_and_unreadable_rng_states(train, synthetic_root, tmp_path, capsys):
    out = tmp_path / "run"
    argv = [*TINY, "--data_root", str(synthetic_root), "--max_iters", "4", "--checkpoint_interval", "2",
            "--output_dir", str(out)]
    run_main(train, argv)
    second, last = complete_checkpoints(out)
    # a re-signed manifest whose iteration was edited: its own checksum passes, the step counts do not
    spare = shutil.copytree(last, tmp_path / "iter_0000004")
    resign_manifest(spare, iteration=17)
    with pytest.raises(ValueError, match=r"manifest.json disagrees with the checkpoint \(iteration 17, but the folder "
                                         r"name 4, train_state.iteration 4, scheduler.bin last_epoch 4\)"):
        checkpointing.verify_checkpoint(spare)
    # the newest manifest edited in place (train_state.iteration 4 -> 3, no new checksum): skipped, falls back
    manifest = json.loads((last / "manifest.json").read_text())
    manifest["train_state"]["iteration"] = 3
    (last / "manifest.json").write_text(json.dumps(manifest, indent=2))
    # the previous one's RNG state replaced with a pickle payload (checksums re-signed): not loaded, and said so
    malicious(second / "random_states_0.pkl", tmp_path / "marker", lambda x: {"state": x})
    resign(second, "random_states_0.pkl")
    # a torn last line in the log, as a full disk during an append leaves it
    with open(out / "train_log.jsonl", "a") as f:
        f.write('{"iteration": 5, "loss": 0.')
    capsys.readouterr()
    results = run_main(train, argv)
    printed = capsys.readouterr().out
    assert f"skipping checkpoint {last}: manifest.json was modified after it was written" in printed
    assert f"warning: {second / 'random_states_0.pkl'} cannot be read with torch.load(weights_only=True)" in printed
    assert "cut off a torn last line (27 bytes" in printed
    assert "resumed from iteration 2" in printed and results["iterations"] == 4
    assert [r["iteration"] for r in log_lines(out) if "loss" in r] == [1, 2, 3, 4, 3, 4]  # every line is JSON
    assert not (tmp_path / "marker").exists()


# ----------------------------------------------------------------------------------------------- full disk
@pytest.mark.parametrize("error", ["safetensors", "torch.save"])
def test_the_writers_own_full_disk_errors_are_one_line(train, synthetic_root, tmp_path, monkeypatch, error):
    from accelerate import Accelerator
    from safetensors import SafetensorError

    def full_disk(self, output_dir=None, **kwargs):
        (Path(output_dir) / "model.safetensors").write_bytes(b"\0" * 10)
        if error == "safetensors":  # what safetensors raises on ENOSPC
            raise SafetensorError('Error while serializing: I/O error: No space left on device (os error 28)')
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 4352 vs 4240")  # torch.save

    monkeypatch.setattr(Accelerator, "save_state", full_disk)
    out = tmp_path / "full"
    with pytest.raises(SystemExit) as stop:
        run_main(train, [*TINY, "--data_root", str(synthetic_root), "--max_iters", "1", "--output_dir", str(out)])
    message = str(stop.value.code)
    expected = "safetensors: Error while serializing" if error == "safetensors" else "torch.save: [enforce fail"
    assert message.startswith(f"error: could not write the checkpoint of iteration 1 into {out / 'checkpoints'} "
                              f"({expected}"), message
    assert "\n" not in message and not complete_checkpoints(out)


def test_save_pretrained_full_disk_is_an_oserror(tmp_path):
    from safetensors import SafetensorError

    class Model:
        def save_pretrained(self, folder):
            raise SafetensorError("Error while serializing: No space left on device (os error 28)")

    with pytest.raises(OSError, match="safetensors: Error while serializing"):
        checkpointing.save_pretrained_atomically(Model(), tmp_path / "final")
    with pytest.raises(RuntimeError, match="a bug"), checkpointing.disk_writes():  # other RuntimeErrors pass
        raise RuntimeError("a bug")


# --------------------------------------------------------------------------------------------- data at eval
def copy_root(synthetic_root, tmp_path) -> Path:
    return shutil.copytree(synthetic_root, tmp_path / "cs")


@pytest.mark.parametrize("bad", ["size mismatch", "bomb header"])
def test_every_pair_is_checked_before_training(train, synthetic_root, tmp_path, bad):
    root = copy_root(synthetic_root, tmp_path)
    label = sorted((root / "gtFine" / "val").glob("*/*_labelTrainIds.png"))[-1]  # the last pair: never decoded
    if bad == "size mismatch":
        Image.fromarray(np.zeros((32, 64), np.uint8)).save(label)
        expected = f"{label}: a 64x32 label for the 128x64 image"
    else:
        data = bytearray(label.read_bytes())
        data[16:24] = (100_000).to_bytes(4, "big") * 2  # IHDR width, height
        label.write_bytes(bytes(data))
        expected = f"{label}: the PNG declares 100000x100000 pixels"
    argv = [*TINY, "--max_iters", "1", "--output_dir", str(tmp_path / "out"), "--data_root", str(root)]
    argv[argv.index("synthetic")] = "cityscapes"
    with pytest.raises(SystemExit) as stop:
        run_main(train, argv)
    assert str(stop.value.code).startswith(f"error: --data_root: {expected}"), stop.value.code
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_a_bad_val_file_at_the_final_evaluation_leaves_the_last_checkpoint(train, synthetic_root, tmp_path):
    root = copy_root(synthetic_root, tmp_path)
    label = sorted((root / "gtFine" / "val").glob("*/*_labelTrainIds.png"))[-1]
    good = label.read_bytes()
    values = np.array(Image.open(label))
    values[0, 0] = 200
    Image.fromarray(values).save(label)  # a complete PNG of the right size: only decoding finds it
    out = tmp_path / "out"
    argv = [*TINY, "--max_iters", "2", "--output_dir", str(out), "--data_root", str(root)]
    argv[argv.index("synthetic")] = "cityscapes"
    with pytest.raises(SystemExit) as stop:
        run_main(train, argv)
    message = str(stop.value.code)
    assert message.startswith("error: the evaluation after iteration 2: ") and str(label) in message, message
    assert "200" in message and "\n" not in message
    assert [p.name for p in complete_checkpoints(out)] == ["iter_0000002"]
    label.write_bytes(good)
    results = run_main(train, argv)  # resumes at 2: only the evaluation and final/ remain
    assert results["iterations"] == 2 and (out / "final" / "model.safetensors").exists()


# ------------------------------------------------------------------------------------ non-finite best / final
def test_a_huge_lr_never_writes_non_finite_best_or_final(train, synthetic_root, tmp_path):
    out = tmp_path / "huge"
    with pytest.raises(SystemExit) as stop:
        run_main(train, [*TINY, "--data_root", str(synthetic_root), "--max_iters", "3", "--lr", "1e6",
                         "--eval_interval", "1", "--checkpoint_interval", "100", "--output_dir", str(out)])
    assert "the model holds non-finite values" in str(stop.value.code), stop.value.code
    for folder in ("best", "final"):
        weights = out / folder / "model.safetensors"
        if weights.exists():
            from safetensors.torch import load_file

            assert all(torch.isfinite(t).all() for t in load_file(weights).values() if t.is_floating_point())


# ------------------------------------------------------------------------------------------- argument values
@pytest.mark.parametrize("argv, message", [
    (["--crop_size", "0", "0"], "argument --crop_size: expected a positive integer, got 0"),
    (["--crop_size", "-64", "128"], "argument --crop_size: expected a positive integer, got -64"),
    (["--seed", "-1"], "argument --seed: expected an integer in [0, 2**32), got -1"),
    (["--seed", str(2**32)], "argument --seed: expected an integer in [0, 2**32), got 4294967296"),
    (["--num_workers", "-1"], "argument --num_workers: expected an integer >= 0, got -1"),
    (["--max_iters", "0"], "argument --max_iters: expected a positive integer, got 0"),
    (["--batch_size", "0"], "argument --batch_size: expected a positive integer, got 0"),
    (["--eval_interval", "0"], "argument --eval_interval: expected a positive integer, got 0"),
    (["--checkpoint_interval", "0"], "argument --checkpoint_interval: expected a positive integer, got 0"),
    (["--lr", "inf"], "argument --lr: expected a finite positive number, got inf"),
    (["--lr", "nan"], "argument --lr: expected a finite positive number, got nan"),
    (["--lr", "-0.1"], "argument --lr: expected a finite positive number, got -0.1"),
    (["--loader_timeout", "0"], "argument --loader_timeout: expected a finite positive number, got 0"),
    (["--target_miou", "nan"], "argument --target_miou: expected a finite number, got nan"),
])
def test_argument_values_are_checked_by_the_parser(train, capsys, argv, message):
    with pytest.raises(SystemExit) as stop:
        train.get_args_parser().parse_args(["--dataset", "synthetic", *argv])
    assert stop.value.code == 2 and message in capsys.readouterr().err


def test_keep_checkpoints_below_two_is_refused(train):
    with pytest.raises(SystemExit, match="--keep_checkpoints must be >= 2, got 1"):
        train.check_args(train.get_args_parser().parse_args(["--dataset", "synthetic", "--keep_checkpoints", "1"]))


# -------------------------------------------------------------------------------------------- unwritable outputs
def test_unwritable_log_curves_and_results(train, synthetic_root, tmp_path, capsys):
    # folders in place of the files: every write fails with an OSError (IsADirectoryError)
    out = tmp_path / "out"
    for name in ("train_log.jsonl", "results.json"):
        (out / name).mkdir(parents=True)
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        run_main(train, [*TINY, "--data_root", str(synthetic_root), "--max_iters", "1", "--output_dir", str(out)])
    printed = capsys.readouterr().out
    assert f"warning: could not append to {out / 'train_log.jsonl'}" in printed
    assert f"warning: could not draw {out / 'training_curves.png'}" in printed
    assert str(stop.value.code).startswith(f"error: could not write {out / 'results.json'} ([Errno 21] Is a "
                                           "directory"), stop.value.code
    assert [p.name for p in complete_checkpoints(out)] == ["iter_0000001"] and (out / "final").is_dir()
