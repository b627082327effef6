r"""Train HRNet-W18 + FCN on Cityscapes with Hugging Face Accelerate: mmsegmentation's fcn_hr18 80k recipe.

    # demo: a small synthetic dataset on the CPU (a few minutes)
    accelerate launch --config_file accelerate_configs/cpu.yaml scripts/train.py --dataset synthetic \
        --pretrained_backbone none --lr 0.1 --max_iters 300 --eval_interval 50 --output_dir out/demo
    # the recipe: 8 GPUs x batch 2, fp16 (1 GPU: accelerate_configs/1gpu.yaml; precision comes from the config)
    accelerate launch --config_file accelerate_configs/8gpu_fp16.yaml scripts/train.py --data_root data/cityscapes
    # after a crash or preemption: the same command plus --resume_from_checkpoint latest
    # SIGTERM / SIGUSR1: the iteration finishes, a checkpoint is saved, exit code 75 (docs/reliability.md)

Accelerate owns the devices, DDP, mixed precision and the gradient scaler; this script owns the recipe. The loop
counts iterations (optimizer steps; one iteration = gradient_accumulation_steps micro-batches per process), not
epochs. Outputs in OUTPUT_DIR: results.json (the benchmark's figures; main() returns the same dict),
train_log.jsonl (one line per log interval and per evaluation), training_curves.png (loss, lr and val mIoU, redrawn
after each evaluation), checkpoints/iter_* (resumable, see modeling/checkpointing.py), best/ and final/
(model folders for scripts/eval.py and for transformers without this repository: docs/huggingface.md), trackers' logs.
"""

import signal
import sys
from pathlib import Path

if __name__ == "__main__":  # SIGTERM / SIGUSR1 during the imports (seconds) wait, pending, until main() handles them
    signal.pthread_sigmask(signal.SIG_BLOCK, (signal.SIGTERM, signal.SIGUSR1))

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import math
import os
import time
from dataclasses import asdict

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from data.hf_dataset import add_hf_dataset_args
from data.training_data import (
    SYNTHETIC,  # noqa: F401 - the demo set's sizes, which tests read as train.SYNTHETIC
    TrainingData,
    cityscapes_training_data,
    hf_training_data,
)
from modeling import strict_json
from modeling.benchmarking import WARMUP_ITERS, Clock, build_results, peak_memory_gib
from modeling.checkpointing import MIN_KEEP, config_differences, list_checkpoints, load_checkpoint, save_checkpoint
from modeling.cli import HelpFormatter, finite_float, non_negative_int, positive_float, positive_int, seed_int
from modeling.cpu_threads import choose_cpu_threads
from modeling.errors import data_error_line
from modeling.inference import evaluate_segmentation
from modeling.metrics import metrics_to_json
from modeling.model_folder import write_model_folder
from modeling.pretrained import DEFAULT_PRETRAINED, check_pretrained_source
from modeling.reliability import (
    DEFAULT_LOADER_TIMEOUT,
    EXIT_PREEMPTED,
    LoaderError,
    NonFiniteError,
    PreemptionFlag,
    StepGuard,
    check_finite_state,
    clear_preemption_marker,
    signal_name,
    write_preemption_marker,
)
from modeling.run_files import append_log, claimed_output_dir, read_log
from modeling.training import (
    LR_END,
    POLY_POWER,
    SYNC_BATCHNORM_CHOICES,
    TrainState,
    accelerator_kwargs,
    augmentation_seed,
    batchnorm_kind,
    check_launch,
    create_model,
    create_optimizer_and_scheduler,
    create_sampler,
    end_processes,
    next_batch,
    train_batches,
    training_step,
)
from modeling.visualize import plot_training_curves


# --------------------------------------------------------------------------------------------------------- data
def load_data(args, accelerator) -> TrainingData:
    """Train and val data: any Hugging Face dataset (--dataset_name), else a Cityscapes-layout root."""
    if args.dataset_name:
        return hf_training_data(args, accelerator, default_pipeline(args, accelerator))
    return cityscapes_training_data(args, accelerator, default_pipeline(args, accelerator))


def set_cpu_threads(args, accelerator) -> None:
    """CPU runs only: intra-op threads from the free cores and loader workers (or --cpu_threads), logged."""
    if accelerator.device.type != "cpu":
        return
    workers = args.num_workers if default_pipeline(args, accelerator) == "reference" else 0  # busy workers
    threads, reason = (args.cpu_threads, "--cpu_threads") if args.cpu_threads else \
        choose_cpu_threads(workers, local_processes=int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    torch.set_num_threads(threads)
    accelerator.print(f"CPU threads: {threads} ({reason})")


# --------------------------------------------------------------------------------------------- eval, checkpoint
def evaluate_and_track(model, val_data, accelerator, state: TrainState, clock, args, output_dir: Path) -> None:
    """Evaluate on the whole val split; log it, redraw the curves; keep the best model; note when --target_miou is
    first met."""
    try:
        metrics = metrics_to_json(evaluate_segmentation(model, *val_data, accelerator, num_workers=args.num_workers))
    except (ValueError, OSError, LoaderError) as err:  # a val file that passed the header checks but not decoding
        raise SystemExit(f"error: the evaluation after iteration {state.iteration}: {data_error_line(err)}; the "
                         "checkpoints are intact: fix or replace the file, then run the same command with "
                         "--resume_from_checkpoint latest") from None
    miou, iteration, wall_s = metrics["mean_iou"], state.iteration, clock.wall_s()  # wall time when the eval ends
    state.final_metrics = metrics
    state.eval_log.append({"iteration": iteration, "wall_s": round(wall_s, 3), "mean_iou": miou})
    if state.time_to_train_s is None and miou >= args.target_miou:
        state.time_to_train_s = wall_s
    log_file = output_dir / "train_log.jsonl"
    log(accelerator, log_file, {"iteration": iteration, "mean_iou": miou, "mean_accuracy": metrics["mean_accuracy"],
                                "overall_accuracy": metrics["overall_accuracy"]})
    plot_curves(accelerator, log_file)  # before best/ is written: its model card shows this evaluation
    if miou > state.best_miou:
        state.best_miou, state.best_iteration, state.best_metrics = miou, iteration, metrics
        if accelerator.is_main_process:
            write_model(accelerator, model, output_dir / "best", iteration, metrics, args)
    accelerator.print(f"iteration {iteration}: mIoU {miou:.4f} (best {state.best_miou:.4f} at {state.best_iteration})")


def write_model(accelerator, model, folder: Path, iteration: int, metrics: dict, args) -> None:
    """The model folder (weights, code, processor, model card) into `folder`, atomically (main process), never
    non-finite weights; a failed write is one line, not a traceback."""
    plain_model = accelerator.unwrap_model(model, keep_torch_compile=False)
    try:
        check_finite_state(plain_model, iteration, writing=str(folder))  # e.g. --lr far too high
    except NonFiniteError as err:
        raise SystemExit(f"error: {err}") from None
    try:
        write_model_folder(plain_model, folder, iteration=iteration, metrics=metrics,
                           recipe=run_config(args, accelerator), curves=folder.parent / "training_curves.png")
    except OSError as err:  # disk full, quota, permissions: the previous `folder` (if any) is untouched
        raise SystemExit(f"error: could not write {folder} ({err}); the checkpoints are intact: free space, then run "
                         "the same command with --resume_from_checkpoint latest") from None


def run_config(args, accelerator) -> dict:
    """The settings that define a run's trajectory: resuming with others is refused unless --force_resume."""
    return {"dataset": args.dataset, "pipeline": default_pipeline(args, accelerator), "crop_size": list(args.crop_size),
            "batch_size": args.batch_size, "gradient_accumulation_steps": args.gradient_accumulation_steps,
            "max_iters": args.max_iters, "lr": args.lr, "seed": args.seed, "pretrained_backbone":
            args.pretrained_backbone, "mixed_precision": accelerator.mixed_precision,
            "sync_batchnorm": args.sync_batchnorm, "dataset_name": args.dataset_name}


def resume(accelerator, args, checkpoints_dir: Path, config: dict, model) -> TrainState:
    """Load the checkpoint --resume_from_checkpoint names (or the newest complete one); a fresh state if none."""
    if args.resume_from_checkpoint is None:
        if list_checkpoints(checkpoints_dir):
            raise SystemExit(f"error: {checkpoints_dir} already holds checkpoints: pass --resume_from_checkpoint "
                             "latest to continue that run, or choose another --output_dir")
        return TrainState()
    try:
        manifest = load_checkpoint(accelerator, args.resume_from_checkpoint, checkpoints_dir, model)
    except ValueError as err:
        raise SystemExit(f"error: --resume_from_checkpoint: {err}") from None
    if manifest is None:
        accelerator.print(f"no checkpoint in {checkpoints_dir}: starting from iteration 0")
        return TrainState()
    differences = config_differences(manifest, config, accelerator.num_processes)
    if differences and not args.force_resume:
        raise SystemExit("error: --resume_from_checkpoint: the checkpoint was made with other settings ("
                         + "; ".join(differences) + "); pass --force_resume to continue anyway")
    accelerator.print(f"resumed from iteration {manifest['iteration']}"
                      + (f" despite: {'; '.join(differences)}" if differences else ""))
    return TrainState(**manifest["train_state"])


# ------------------------------------------------------------------------------------------------ launch checks
def default_pipeline(args, accelerator) -> str:
    # "fast" augments whole batches on the device: a win on GPUs. On the CPU it would run in the training process
    # instead of in parallel loader workers, so the per-sample "reference" pipeline is the default there.
    return args.pipeline or ("fast" if accelerator.device.type == "cuda" else "reference")


def check_args(args) -> None:
    """Cheap checks before anything heavy starts (beyond the parser's: positive integers, finite numbers): one line
    naming the argument and what was expected."""
    if args.keep_checkpoints < MIN_KEEP:
        raise SystemExit(f"error: --keep_checkpoints must be >= {MIN_KEEP}, got {args.keep_checkpoints}")
    if not LR_END < args.lr:
        raise SystemExit(f"error: --lr must be above the poly schedule's end value {LR_END}, got {args.lr}")
    if not 0.0 <= args.target_miou <= 1.0:
        raise SystemExit(f"error: --target_miou is a fraction in [0, 1] (e.g. 0.7811), got {args.target_miou}")
    try:
        check_pretrained_source(args.pretrained_backbone)  # before any download or heavy work
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None
    if args.dataset == "cityscapes" and not (args.data_root or args.dataset_name):
        raise SystemExit("error: --data_root is required with --dataset cityscapes (or use --dataset synthetic or "
                         "--dataset_name)")
    if args.dataset_name and (args.data_root or args.dataset == "synthetic"):
        raise SystemExit("error: --dataset_name replaces --data_root and --dataset synthetic; expected one of them")
    if args.init_from is not None and not (Path(args.init_from) / "config.json").is_file():
        raise SystemExit(f"error: --init_from {args.init_from}: no config.json; expected a save_pretrained folder "
                         "(e.g. a run's final/; scripts/convert_mmseg_checkpoint.py converts a reference .pth)")


# -------------------------------------------------------------------------------------------------- reliability
def check_health(guard: StepGuard, done: int) -> int | None:
    """The periodic cross-process check: the number of a preemption signal any process received, else None."""
    try:
        return guard.check(done)
    except NonFiniteError as err:  # too many consecutive non-finite steps (none of them applied)
        raise SystemExit(f"error: {err}") from None


def save(accelerator, model, state: TrainState, clock, guard: StepGuard, config: dict, args, global_batch: int) -> Path:
    """Checkpoint the state after state.iteration iterations (collective), never a non-finite one."""
    paused_at = clock.pause()
    clock.update(state, state.iteration, global_batch)
    state.skipped_steps = guard.skipped_steps
    try:
        check_finite_state(accelerator.unwrap_model(model, keep_torch_compile=False), state.iteration)
    except NonFiniteError as err:
        raise SystemExit(f"error: {err}") from None
    checkpoints_dir = Path(args.output_dir) / "checkpoints"
    try:
        path = save_checkpoint(accelerator, checkpoints_dir, state.iteration, keep=args.keep_checkpoints,
                               config=config, train_state=asdict(state))
    except OSError as err:  # disk full, quota, permissions: what was written stays in a .tmp- folder, never read
        raise SystemExit(f"error: could not write the checkpoint of iteration {state.iteration} into "
                         f"{checkpoints_dir} ({err}); the earlier checkpoints are intact: free space, then run the "
                         "same command with --resume_from_checkpoint latest") from None
    clock.resume(paused_at)
    return path


def exit_preempted(accelerator, preemption: PreemptionFlag, signum: int, iteration: int, checkpoint: Path,
                   output_dir: Path) -> None:
    """After a preemption signal seen by every process: leave a marker, end cleanly, exit with EXIT_PREEMPTED."""
    if accelerator.is_main_process:
        write_preemption_marker(output_dir, iteration, signum, checkpoint)
    accelerator.print(f"{signal_name(signum)}: stopped after iteration {iteration}, checkpoint {checkpoint}; exit "
                      f"code {EXIT_PREEMPTED}: run the same command (with --resume_from_checkpoint) to continue")
    shutdown(accelerator, preemption)
    raise SystemExit(EXIT_PREEMPTED)


def shutdown(accelerator, preemption: PreemptionFlag) -> None:
    accelerator.wait_for_everyone()
    end_processes(accelerator)
    preemption.restore()


# --------------------------------------------------------------------------------------------------------- main
def main(args) -> dict:
    preemption = PreemptionFlag().install()  # first: SIGTERM / SIGUSR1 only set a flag, acted on between iterations
    check_args(args)
    with claimed_output_dir(Path(args.output_dir)):  # a second run into the same folder is refused
        return train(args, preemption)


def train(args, preemption: PreemptionFlag) -> dict:
    accelerator = Accelerator(gradient_accumulation_steps=args.gradient_accumulation_steps,
                              step_scheduler_with_optimizer=False,  # see create_optimizer_and_scheduler
                              log_with=None if args.report_to == "none" else args.report_to,
                              project_dir=args.output_dir, dynamo_backend="inductor" if args.compile else None,
                              kwargs_handlers=accelerator_kwargs(args.sync_batchnorm))  # DDP, fp16 scale
    check_launch(accelerator)
    set_cpu_threads(args, accelerator)
    output_dir, device, rank = Path(args.output_dir), accelerator.device, accelerator.process_index
    checkpoints_dir = output_dir / "checkpoints"
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        clear_preemption_marker(output_dir)
    set_seed(args.seed)  # the same initial weights on every process (DDP also broadcasts rank 0's)
    global_batch = args.batch_size * args.gradient_accumulation_steps * accelerator.num_processes

    data = load_data(args, accelerator)
    args.crop_size, train_set, train_on_device, val_data = data.crop_size, data.train_set, data.on_device, data.val_data
    sampler = create_sampler(train_set, accelerator, args.batch_size, args.seed, data.name)

    model = create_model(args.pretrained_backbone, args.channels_last, accelerator, args.sync_batchnorm, data.id2label,
                         args.init_from)
    batchnorm = batchnorm_kind(model)  # what runs: one process is plain BN whatever the flag
    # saved in config.json beside the weights: scripts/eval.py --checkpoint OUTPUT_DIR/final finds the data itself
    model.config.training_data = data.record
    optimizer, scheduler = create_optimizer_and_scheduler(model, args.lr, args.max_iters)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    config = run_config(args, accelerator)
    state = resume(accelerator, args, checkpoints_dir, config, model)
    guard = StepGuard(accelerator, model, optimizer, preemption, max_nonfinite_steps=args.max_nonfinite_steps,
                      check_interval=args.check_interval, skipped_steps=state.skipped_steps)
    accelerator.init_trackers("train", config={k: v if isinstance(v, int | float | str | bool) else str(v)
                                               for k, v in vars(args).items()})  # trackers run on the main process
    accelerator.print(f"{accelerator.num_processes} process(es) on {device}, mixed precision "
                      f"{accelerator.mixed_precision}, global batch {global_batch}, iterations "
                      f"{state.iteration} -> {args.max_iters}, pipeline {config['pipeline']}, sync BN {batchnorm}")

    batches = train_batches(train_set, sampler, args.batch_size, args.num_workers,
                            first_batch=state.iteration * args.gradient_accumulation_steps,
                            pin_memory=device.type == "cuda", timeout=args.loader_timeout)
    generator = torch.Generator(device=device)
    clock = Clock(state, device, warmup_until=state.iteration + min(WARMUP_ITERS,
                                                                    (args.max_iters - state.iteration) // 4))
    loss_sum, window_start, data_time, window_paused = torch.zeros((), device=device), state.iteration, 0.0, 0.0
    log_t0 = time.perf_counter()
    log_file = output_dir / "train_log.jsonl"
    model.train()
    progress = tqdm(total=args.max_iters, initial=state.iteration, disable=not accelerator.is_local_main_process,
                    desc="train")
    for iteration in range(state.iteration, args.max_iters):
        clock.before_iteration(iteration)
        generator.manual_seed(augmentation_seed(args.seed, rank, iteration))
        for _ in range(args.gradient_accumulation_steps):
            t = time.perf_counter()
            pixel_values, labels = next_batch(batches, train_on_device, device, generator, args.channels_last)
            data_time += time.perf_counter() - t
            loss_sum += training_step(model, optimizer, accelerator, guard, iteration, pixel_values, labels)
        guard.after_iteration()  # counts the skipped updates, on the device
        lr = scheduler.get_last_lr()[0]  # the lr this iteration's update used
        scheduler.step()
        state.iteration = done = iteration + 1
        progress.update()
        preempted = done < args.max_iters and check_health(guard, done)  # a signal number, every --check_interval

        if done % args.log_interval == 0 or done == args.max_iters:
            loss_mean = accelerator.reduce(loss_sum, "mean").item() / ((done - window_start)
                                                                        * args.gradient_accumulation_steps)
            seconds = (time.perf_counter() - log_t0 - (clock.paused - window_paused)) / (done - window_start)
            record = {"iteration": done, "loss": loss_mean, "lr": lr, "time_per_iter_s": seconds,
                      "data_time_s": data_time / (done - window_start), "images_per_s": global_batch / seconds,
                      "peak_memory_gib": peak_memory_gib(device), "skipped_steps": guard.skipped_steps}
            log(accelerator, log_file, record, progress)
            loss_sum.zero_()
            window_start, data_time, window_paused, log_t0 = done, 0.0, clock.paused, time.perf_counter()

        if done == args.max_iters:  # before the final evaluation: a bad val file met there leaves this checkpoint
            checkpoint = save(accelerator, model, state, clock, guard, config, args, global_batch)
        if done % args.eval_interval == 0 or done == args.max_iters:
            paused_at = clock.pause()
            clock.update(state, done, global_batch)
            evaluate_and_track(model, val_data, accelerator, state, clock, args, output_dir)
            clock.resume(paused_at)
        if (done % args.checkpoint_interval == 0 or preempted) and done < args.max_iters:
            checkpoint = save(accelerator, model, state, clock, guard, config, args, global_batch)
        if preempted:
            exit_preempted(accelerator, preemption, preempted, done, checkpoint, output_dir)
    progress.close()

    if state.final_metrics is None:  # only when resuming past --max_iters (forced): the loop did not run
        evaluate_and_track(model, val_data, accelerator, state, clock, args, output_dir)
    clock.update(state, state.iteration, global_batch)
    results = {**build_results(state, args.target_miou, accelerator, global_batch), "sync_batchnorm": batchnorm}
    if accelerator.is_main_process:
        write_model(accelerator, model, output_dir / "final", state.iteration, state.final_metrics, args)
        try:
            (output_dir / "results.json").write_text(strict_json.dumps(results, indent=2))
        except OSError as err:
            raise SystemExit(f"error: could not write {output_dir / 'results.json'} ({err}); the checkpoints and "
                             "final/ are intact: free space, then run the same command with --resume_from_checkpoint "
                             "latest") from None
    accelerator.print(f"done: final mIoU {results['final_miou']:.4f}, best {results['best_miou']:.4f}, "
                      f"{results['images_per_sec'] or math.nan:.2f} images/s; results in {output_dir}")
    shutdown(accelerator, preemption)
    return results


def log(accelerator, log_file: Path, record: dict, progress=None) -> None:
    """One record to the trackers, to train_log.jsonl and to the progress bar (main process only)."""
    accelerator.log({k: v for k, v in record.items() if k != "iteration"}, step=record["iteration"])
    if accelerator.is_main_process:
        try:
            append_log(log_file, record)
        except OSError as err:  # the log is not worth stopping a run for; checkpoints are written separately
            print(f"warning: could not append to {log_file} ({err}); training goes on", flush=True)
        if progress is not None:
            progress.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                 img_s=f"{record['images_per_s']:.1f}")


def plot_curves(accelerator, log_file: Path) -> None:
    """OUTPUT_DIR/training_curves.png (loss, lr, val mIoU) from train_log.jsonl, redrawn after each evaluation."""
    if accelerator.is_main_process:
        try:
            plot_training_curves(read_log(log_file), log_file.with_name("training_curves.png"))
        except OSError as err:
            print(f"warning: could not draw {log_file.with_name('training_curves.png')} ({err}); training goes on",
                  flush=True)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", choices=("cityscapes", "synthetic"), default="cityscapes",
                      help="synthetic: generate a small Cityscapes-format set (under --data_root if given, else "
                           "OUTPUT_DIR/synthetic_cityscapes) and train on it")
    data.add_argument("--data_root", default=None, help="Cityscapes root (leftImg8bit/, gtFine/ after "
                      "scripts/prepare_cityscapes.py)")
    add_hf_dataset_args(data)
    data.add_argument("--pipeline", choices=("fast", "reference"), default=None,
                      help="training augmentation: fast = batched on the device (default on GPUs), reference = "
                           "per sample in the loader workers (default on the CPU)")
    data.add_argument("--crop_size", type=positive_int, nargs=2, default=None, metavar=("H", "W"),
                      help="training crop (default: 512 1024, the recipe; --dataset synthetic, --dataset_name: at most "
                           "the images)")
    data.add_argument("--num_workers", type=non_negative_int, default=2,
                      help="loader workers per process (the reference: 2)")
    data.add_argument("--loader_timeout", type=positive_float, default=DEFAULT_LOADER_TIMEOUT,
                      help="seconds to wait for one batch from the loader workers before stopping with an error")
    recipe = parser.add_argument_group("recipe")
    recipe.add_argument("--batch_size", type=positive_int, default=2, help="images per process per micro-batch")
    recipe.add_argument("--gradient_accumulation_steps", type=positive_int, default=1)
    recipe.add_argument("--max_iters", type=positive_int, default=80_000, help="optimizer steps")
    recipe.add_argument("--lr", type=positive_float, default=0.01,
                        help=f"initial lr; poly {POLY_POWER} decay to {LR_END}")
    recipe.add_argument("--pretrained_backbone", default=DEFAULT_PRETRAINED,
                        help="timm tag, local weights file, or 'none' (random init)")
    recipe.add_argument("--init_from", default=None, metavar="FOLDER",
                        help="fine-tune a trained model (a save_pretrained folder, e.g. a Cityscapes run's final/) "
                             "instead of --pretrained_backbone; another class count re-initialises its classifier")
    recipe.add_argument("--seed", type=seed_int, default=0)
    speed = parser.add_argument_group("speed (precision comes from the Accelerate config)")
    speed.add_argument("--channels_last", action="store_true")
    speed.add_argument("--compile", action="store_true", help="torch.compile (inductor) through Accelerate")
    speed.add_argument("--sync_batchnorm", choices=SYNC_BATCHNORM_CHOICES, default="ours",
                       help="BatchNorm over several processes: ours = statistics of the global batch, no host sync, "
                            "CPU and CUDA; torch = nn.SyncBatchNorm (CUDA only); off = per-process batch statistics. "
                            "One process: plain BN whatever the choice (docs/batchnorm.md)")
    speed.add_argument("--cpu_threads", type=positive_int, default=None, metavar="N",
                       help="CPU runs: intra-op threads per process (default: auto, the cores left free by other "
                            "jobs' load and the loader workers)")
    run = parser.add_argument_group("run")
    run.add_argument("--output_dir", default="out/train")
    run.add_argument("--eval_interval", type=positive_int, default=1000, help="iterations (the benchmark: 1000); "
                     "the last iteration is always evaluated")
    run.add_argument("--target_miou", type=finite_float, default=0.7811,
                     help="Time2train: wall seconds until the first evaluation at or above this mIoU (fraction)")
    run.add_argument("--checkpoint_interval", type=positive_int, default=1000)
    run.add_argument("--keep_checkpoints", type=positive_int, default=2,
                     help=f"complete checkpoints kept (>= {MIN_KEEP})")
    run.add_argument("--resume_from_checkpoint", nargs="?", const="latest", default=None, metavar="latest|PATH",
                     help="'latest' (the default when given without a value): the newest complete checkpoint in "
                          "OUTPUT_DIR/checkpoints, or a fresh start if there is none")
    run.add_argument("--force_resume", action="store_true",
                     help="resume even if the checkpoint was made with other settings or another process count")
    run.add_argument("--log_interval", type=positive_int, default=50)
    run.add_argument("--check_interval", type=positive_int, default=10,
                     help="iterations between the cross-process checks for a preemption signal (SIGTERM/SIGUSR1: "
                          "checkpoint, exit code 75) and for non-finite steps: one tiny all-reduce each")
    run.add_argument("--max_nonfinite_steps", type=positive_int, default=20,
                     help="stop after this many consecutive steps with a non-finite loss or gradients (none is applied;"
                          " fp16: steps the gradient scaler skipped)")
    run.add_argument("--report_to", default="none",
                     help="Accelerate trackers: none, all, tensorboard, wandb, ... (comma-free single name)")
    return parser


if __name__ == "__main__":
    main(get_args_parser().parse_args())
