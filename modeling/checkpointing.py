"""Crash-safe training checkpoints on top of `accelerator.save_state` / `accelerator.load_state`.

Layout under a run's checkpoint folder (train.py uses OUTPUT_DIR/checkpoints):

    iter_0001000/            complete: Accelerate's files (model.safetensors, optimizer.bin, scheduler.bin,
                             [scaler.pt], random_states_<rank>.pkl) + manifest.json
    iter_0002000/
    .tmp-iter_0003000/       being written, or left behind by a crash: never read, replaced by the next save

A checkpoint is written into `.tmp-<name>` beside its final place, every file is fsync'ed, then manifest.json
(iteration, sha256 of every file, the run's config and its hash, world size, versions, the caller's
`train_state`, and the sha256 of the manifest's own canonical JSON) is written last, and the folder is renamed into
place. A folder therefore counts as complete only when its manifest exists, is intact, agrees with itself (the
iteration of the folder name, of `train_state` and of the lr scheduler's step count) and every checksum
matches: a crash at any moment leaves either the old set of checkpoints or the old set plus one complete new one.
Old checkpoints are deleted only after the new one is in
place, and at least two complete ones are always kept, so a checkpoint corrupted later on disk still leaves one
to fall back to. Loading uses Accelerate's loaders, which read the non-safetensors files with
torch.load(weights_only=True); nothing here unpickles anything (objects registered with
`register_for_checkpointing` would be loaded with weights_only=False by Accelerate, so the training loop keeps its
own state in the manifest's JSON instead).

Checkpoints are written by every process into one folder: on several machines the folder must be on a shared
filesystem (rank 0 checksums the other ranks' files).
"""

import hashlib
import json
import os
import pickle
import platform
import re
import shutil
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import torch
from accelerate.utils import broadcast_object_list, load
from safetensors import SafetensorError

from modeling import strict_json
from modeling.errors import first_line
from modeling.weights import check_state_dict

MANIFEST = "manifest.json"
FORMAT = 2  # 2: the manifest holds its own checksum ("manifest_sha256"); 1 (no checksum) is still read
# What torch.save raises, as a RuntimeError, when the disk is full (e.g. "unexpected pos 64 vs 0").
_TORCH_WRITE_FAILURES = ("PytorchStreamWriter failed", "unexpected pos", "file write failed")
MIN_KEEP = 2  # a checkpoint corrupted after it was written must leave a complete one behind
_NAME = re.compile(r"^iter_(\d+)$")
_CHUNK = 1 << 22


def checkpoint_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def config_hash(config: dict) -> str:
    """A short, stable hash of a JSON-able config (key order does not matter)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def versions() -> dict:
    import accelerate
    import timm
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "accelerate": accelerate.__version__,
            "transformers": transformers.__version__, "timm": timm.__version__}


def _sha256_and_fsync(path: Path) -> str:
    """Hash a file and force it to disk in one pass (fsync works on a read-only descriptor on POSIX)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
        os.fsync(f.fileno())
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    # A rename or a new file is durable only once its directory entry is; not possible on Windows.
    if os.name == "posix":
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def manifest_checksum(manifest: dict) -> str:
    """sha256 of the manifest's canonical JSON (sorted keys, no spaces), its own checksum left out."""
    rest = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(rest, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@contextmanager
def disk_writes():
    """A failed write as OSError whatever the writer raises: safetensors raises SafetensorError and torch.save a
    RuntimeError on a full disk, so that callers can report every failed write as one line."""
    try:
        yield
    except SafetensorError as err:
        raise OSError(f"safetensors: {first_line(err)}") from err
    except RuntimeError as err:
        if not any(text in str(err) for text in _TORCH_WRITE_FAILURES):
            raise
        raise OSError(f"torch.save: {first_line(err)}") from err


def _write_json_durably(path: Path, obj: dict) -> None:
    with open(path, "w") as f:
        f.write(strict_json.dumps(obj, indent=2))
        f.flush()
        os.fsync(f.fileno())


# ----------------------------------------------------------------------------------------------------------- save
def save_checkpoint(accelerator, checkpoints_dir, iteration: int, *, keep: int, config: dict,
                    train_state: dict) -> Path:
    """Save Accelerate's state for `iteration` atomically, then delete all but the newest `keep` complete ones.

    Collective: every process must call it. `config` (the settings that define the run) and `train_state`
    (JSON-able loop state: iteration counters, eval history, ...) go into the manifest. Returns the final path.
    """
    if keep < MIN_KEEP:
        raise ValueError(f"keep: at least {MIN_KEEP} checkpoints must be kept, got {keep}")
    checkpoints_dir = Path(checkpoints_dir)
    final = checkpoints_dir / checkpoint_name(iteration)
    tmp = checkpoints_dir / f".tmp-{final.name}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)  # a crashed earlier attempt at the same iteration
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    with disk_writes():
        accelerator.save_state(str(tmp))  # rank 0 writes model/optimizer/scheduler/scaler; each rank its RNG states
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        files = {p.name: {"sha256": _sha256_and_fsync(p), "bytes": p.stat().st_size}
                 for p in sorted(tmp.iterdir()) if p.is_file()}
        manifest = {"format": FORMAT, "iteration": iteration, "world_size": accelerator.num_processes,
                    "mixed_precision": accelerator.mixed_precision, "config_hash": config_hash(config),
                    "config": config, "versions": versions(), "files": files, "train_state": train_state}
        manifest["manifest_sha256"] = manifest_checksum(manifest)
        _write_json_durably(tmp / MANIFEST, manifest)
        _fsync_dir(tmp)
        _replace_dir(tmp, final)
        for stale in checkpoints_dir.glob(".tmp-iter_*"):  # left by crashed saves; only one save runs at a time
            shutil.rmtree(stale, ignore_errors=True)
        prune_checkpoints(checkpoints_dir, keep)
    accelerator.wait_for_everyone()
    return final


def _replace_dir(src: Path, dst: Path) -> None:
    """Rename src to dst; an existing dst (an incomplete or corrupt one we fell back from) is moved away first."""
    trash = dst.with_name(f".trash-{dst.name}")
    shutil.rmtree(trash, ignore_errors=True)
    if dst.exists():
        os.rename(dst, trash)
    os.rename(src, dst)
    _fsync_dir(dst.parent)
    shutil.rmtree(trash, ignore_errors=True)


def prune_checkpoints(checkpoints_dir, keep: int) -> list[Path]:
    """Delete every checkpoint folder older than the `keep`-th newest *complete* one; return what was deleted.

    Completeness here is the manifest's presence (checksumming every old checkpoint on each save would be slow);
    incomplete folders newer than that are left for `find_latest_checkpoint` to report.
    """
    folders = list_checkpoints(checkpoints_dir)
    complete = [path for _, path in folders if (path / MANIFEST).is_file()]
    if len(complete) <= keep:
        return []
    oldest_kept = _iteration_of(complete[-keep])
    deleted = [path for iteration, path in folders if iteration < oldest_kept]
    for path in deleted:
        shutil.rmtree(path, ignore_errors=True)
    return deleted


# ----------------------------------------------------------------------------------------------------------- find
def _iteration_of(path: Path) -> int:
    return int(_NAME.match(path.name).group(1))


def list_checkpoints(checkpoints_dir) -> list[tuple[int, Path]]:
    """(iteration, path) of every iter_* folder, complete or not, oldest first."""
    checkpoints_dir = Path(checkpoints_dir)
    if not checkpoints_dir.is_dir():
        return []
    return sorted((_iteration_of(p), p) for p in checkpoints_dir.iterdir() if p.is_dir() and _NAME.match(p.name))


def verify_checkpoint(path) -> dict:
    """Return the manifest of a complete, intact checkpoint; raise ValueError saying what is wrong otherwise."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"{path}: not a checkpoint folder")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        raise ValueError(f"{path}: incomplete (no {MANIFEST}; the save did not finish)") from None
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: unreadable {MANIFEST} ({err})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict) or "iteration" not in manifest:
        raise ValueError(f"{path}: {MANIFEST} lacks 'iteration' or 'files'")
    if manifest.get("format", 1) >= 2 and manifest.get("manifest_sha256") != manifest_checksum(manifest):
        raise ValueError(f"{path}: {MANIFEST} was modified after it was written (its own sha256 differs)")
    for name, entry in manifest["files"].items():
        file = path / name
        if not file.is_file():
            raise ValueError(f"{path}: file {name} listed in the manifest is missing")
        if file.stat().st_size != entry["bytes"] or _sha256_and_fsync(file) != entry["sha256"]:
            raise ValueError(f"{path}: file {name} is corrupt (size or sha256 differs from the manifest)")
    if problem := _step_count_problem(path, manifest):
        raise ValueError(f"{path}: {MANIFEST} disagrees with the checkpoint ({problem})")
    return manifest


def _step_count_problem(path: Path, manifest: dict) -> str | None:
    """The manifest's iteration against the folder name, train_state and the lr schedulers' step counts (the loop
    steps them once per iteration); None when they agree."""
    iteration = manifest["iteration"]
    counts = {}
    if _NAME.match(path.name):
        counts["the folder name"] = _iteration_of(path)
    if isinstance(manifest.get("train_state"), dict) and "iteration" in manifest["train_state"]:
        counts["train_state.iteration"] = manifest["train_state"]["iteration"]
    for file in sorted(path.glob("scheduler*.bin")):  # Accelerate's names: scheduler.bin, scheduler_1.bin, ...
        try:
            counts[f"{file.name} last_epoch"] = torch.load(file, weights_only=True, map_location="cpu")["last_epoch"]
        except Exception as err:  # noqa: BLE001 (any unreadable file makes the checkpoint unusable)
            return f"{file.name} unreadable: {first_line(err)}"
    wrong = [f"{what} {count}" for what, count in counts.items() if count != iteration]
    return f"iteration {iteration}, but {', '.join(wrong)}" if wrong else None


def find_latest_checkpoint(checkpoints_dir) -> tuple[Path | None, list[str]]:
    """The newest complete, intact checkpoint (or None) and one line per newer folder skipped, saying why."""
    skipped = []
    for _, path in reversed(list_checkpoints(checkpoints_dir)):
        try:
            verify_checkpoint(path)
            return path, skipped
        except ValueError as err:
            skipped.append(str(err))
    return None, skipped


def resolve_checkpoint(spec: str, checkpoints_dir) -> tuple[Path | None, list[str]]:
    """`spec` "latest" -> the newest complete checkpoint under checkpoints_dir, or None when there is no
    checkpoint folder at all (a first launch: the same command can start and resume a run); any other `spec` is a
    checkpoint folder. Raises ValueError when nothing usable is found. Returns (path, skipped-folder messages)."""
    if spec != "latest":
        verify_checkpoint(spec)
        return Path(spec), []
    path, skipped = find_latest_checkpoint(checkpoints_dir)
    if path is None and skipped:
        raise ValueError(f"{checkpoints_dir}: no complete checkpoint to resume from (" + "; ".join(skipped) + ")")
    return path, skipped


def config_differences(manifest: dict, config: dict, world_size: int) -> list[str]:
    """What differs between a checkpoint and the run resuming it ("key: saved -> now"); empty if nothing."""
    saved = manifest.get("config", {})
    differences = [f"{key}: {saved.get(key)!r} -> {config.get(key)!r}"
                   for key in sorted(set(saved) | set(config)) if saved.get(key) != config.get(key)]
    if manifest.get("world_size") != world_size:
        differences.append(f"world size: {manifest.get('world_size')} -> {world_size}")
    return differences


# ----------------------------------------------------------------------------------------------------------- load
def check_checkpoint_fits(model, weights_file) -> None:
    """The tensors of a safetensors file (read from its header only) must match `model`'s names and shapes."""
    from safetensors import safe_open

    with safe_open(str(weights_file), framework="pt") as f:
        shapes = {key: SimpleNamespace(shape=tuple(f.get_slice(key).get_shape())) for key in f.keys()}
    classes = getattr(getattr(model, "config", None), "num_labels", None)
    head = shapes.get("decode_head.conv_seg.weight")
    if classes is not None and head is not None and head.shape[0] != classes:
        raise ValueError(f"{weights_file}: a model with {head.shape[0]} classes, this run's model has {classes}")
    check_state_dict(shapes, model.state_dict(), str(weights_file))


def load_checkpoint(accelerator, spec: str, checkpoints_dir, model=None) -> dict | None:
    """Resolve `spec` ("latest" or a folder) on the main process, tell every process, load it everywhere.

    Returns the manifest (None when "latest" found no checkpoint folder). A bad checkpoint raises ValueError on
    every process (so none is left waiting in a collective). Skipped folders are printed by the main process.
    With `model`, the checkpoint's tensor names and shapes are compared with it first (another number of classes
    is named as such rather than failing deep inside load_state_dict).
    """
    answer = [None, None]  # [path, error]
    if accelerator.is_main_process:
        try:
            path, skipped = resolve_checkpoint(spec, checkpoints_dir)
            for line in skipped:
                accelerator.print(f"skipping checkpoint {line}")
            answer = [None if path is None else str(path), None]
        except ValueError as err:
            answer = [None, str(err)]
    answer = broadcast_object_list(answer)
    path, error = answer
    if error is not None:
        raise ValueError(error)
    if path is None:
        return None
    if model is not None and (Path(path) / "model.safetensors").is_file():
        # Accelerate saves a torch.compile'd model under its own names (no `_orig_mod.` prefix): compare with those
        plain_model = accelerator.unwrap_model(model, keep_torch_compile=False)
        check_checkpoint_fits(plain_model, Path(path) / "model.safetensors")
    if problem := _unreadable_rng_states(Path(path), accelerator.process_index):
        print(f"warning: {problem}")  # every process for its own file: Accelerate only logs this at INFO level
    try:
        accelerator.load_state(path)
    except pickle.UnpicklingError as err:  # a global that weights_only=True refuses: never unpickled
        raise ValueError(f"{path}: a file cannot be read with torch.load(weights_only=True): {first_line(err)}"
                         ) from err
    return json.loads((Path(path) / MANIFEST).read_text())


def _unreadable_rng_states(path: Path, rank: int) -> str | None:
    """Accelerate skips a random_states_<rank>.pkl that torch.load(weights_only=True) refuses without saying so."""
    file = path / f"random_states_{rank}.pkl"
    if not file.is_file():
        return None
    try:
        load(file)  # Accelerate's loader: torch.load(weights_only=True) with its allow-list (numpy RNG state)
    except Exception as err:  # noqa: BLE001 (whatever the reason, Accelerate will not restore it)
        return (f"{file} cannot be read with torch.load(weights_only=True) ({first_line(err)}); not loaded: the "
                "random number generators of this process are not restored")
    return None


def save_pretrained_atomically(model, out_dir, add_files: Callable[[Path], None] | None = None) -> Path:
    """`model.save_pretrained` into a temporary folder beside out_dir, then swap it in (call on one process).
    `add_files(tmp)` writes more files into the folder before the swap (the processor, the model card)."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".tmp-{out_dir.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    with disk_writes():
        model.save_pretrained(tmp)
        if add_files is not None:
            add_files(tmp)
    for file in tmp.iterdir():
        _sha256_and_fsync(file)
    _fsync_dir(tmp)
    _replace_dir(tmp, out_dir)
    return out_dir
