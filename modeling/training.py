"""What a training iteration is made of, shared by scripts/train.py and the throughput benchmark (which times it).

    accelerator = Accelerator(kwargs_handlers=accelerator_kwargs(sync_batchnorm), ...)  # sync_batchnorm: ours|torch|off
    model = create_model(pretrained, channels_last, accelerator, sync_batchnorm)
    optimizer, scheduler = create_optimizer_and_scheduler(model, lr, max_iters)
    batches = train_batches(dataset, ResumableSampler(dataset, num_processes, rank, seed), batch_size, ...)
    pixel_values, labels = next_batch(batches, on_device, device, generator, channels_last)
    loss = training_step(model, optimizer, accelerator, guard, iteration, pixel_values, labels)
"""

import itertools
import os
from dataclasses import dataclass, field

import torch
from accelerate.utils import DistributedDataParallelKwargs, GradScalerKwargs
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler
from transformers import get_polynomial_decay_schedule_with_warmup

from data import batch_to_device
from modeling.cli import refuse_fp16_on_cpu
from modeling.hrnet_fcn import HRNetFCNConfig, HRNetFCNForSemanticSegmentation
from modeling.pretrained import load_pretrained_backbone
from modeling.reliability import DEFAULT_LOADER_TIMEOUT, StepGuard, explain_loader_errors, loader_kwargs
from modeling.sync_batchnorm import SyncBatchNorm, convert_sync_batchnorm

# The recipe (docs/recipe.md section 5): SGD on every parameter, poly decay to LR_END per iteration, no warmup.
MOMENTUM, WEIGHT_DECAY, LR_END, POLY_POWER = 0.9, 5e-4, 1e-4, 0.9
# fp16 starts at the reference's loss scale (mmcv's static 512, docs/recipe.md) instead of torch's 2**16, which
# overflows the first steps of a fresh run; GradScaler's dynamic backoff and growth stay on.
FP16_INIT_SCALE = 512.0


# -------------------------------------------------------------------------------------------------------- model
# --sync_batchnorm: ours = modeling.sync_batchnorm (any backend, no host sync), torch = nn.SyncBatchNorm (CUDA only),
# off = each process normalizes its own batch. One process always runs plain BN (no collective to make).
SYNC_BATCHNORM_CHOICES = ("ours", "torch", "off")


def apply_sync_batchnorm(model: nn.Module, choice: str, accelerator) -> nn.Module:
    """The BatchNorm that training runs, per --sync_batchnorm (docs/recipe.md section 5: SyncBN on several GPUs).

    Call it before `accelerator.prepare` (DDP must wrap the converted modules) and build the Accelerator with
    `ddp_kwargs(choice)`. "ours" on several processes of any device; "torch" on several CUDA processes (refused on
    the CPU, where torch's exists only on paper); "off", or one process: the model unchanged. The state dict keys
    stay the same every way, so checkpoints load either way.
    """
    if choice not in SYNC_BATCHNORM_CHOICES:
        raise SystemExit(f"error: --sync_batchnorm must be one of {', '.join(SYNC_BATCHNORM_CHOICES)}, got {choice!r}")
    if choice == "torch" and accelerator.device.type != "cuda":
        raise SystemExit("error: --sync_batchnorm torch: torch's nn.SyncBatchNorm runs on CUDA only; on CPU "
                         "processes use ours (the default) or off")
    if accelerator.num_processes == 1 or choice == "off":
        return model
    if choice == "torch":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return convert_sync_batchnorm(model)


def batchnorm_kind(model: nn.Module) -> str:
    """Which BatchNorm a (possibly wrapped) model runs: "ours", "torch" or "off" (per-process), for results."""
    modules = list(model.modules())
    if any(isinstance(m, SyncBatchNorm) for m in modules):
        return "ours"
    return "torch" if any(isinstance(m, nn.SyncBatchNorm) for m in modules) else "off"


def ddp_kwargs(choice: str) -> DistributedDataParallelKwargs:
    """DDP's settings for the Accelerator (kwargs_handlers=[...]) that go with --sync_batchnorm `choice`.

    broadcast_buffers: DDP copies rank 0's buffers (the BN running statistics) to every rank before each forward.
    Synchronized BN computes identical statistics on every rank, so the copy would cost one collective per step
    for nothing (the reference's mmseg also runs DDP with broadcast_buffers=False). Per-process BN keeps it: the
    ranks' statistics would drift apart, and the sharded evaluation and rank 0's saved weights assume one model.
    The gradient buckets keep DDP's defaults (bucket_cap_mb 25, first bucket 1 MiB; BENCHMARKS.md).
    """
    return DistributedDataParallelKwargs(broadcast_buffers=choice == "off")


def accelerator_kwargs(sync_batchnorm: str) -> list:
    """The Accelerator's kwargs_handlers for training: DDP's settings (ddp_kwargs) and the fp16 loss scale."""
    return [ddp_kwargs(sync_batchnorm), GradScalerKwargs(init_scale=FP16_INIT_SCALE)]


def to_channels_last(model: nn.Module) -> nn.Module:
    """Store conv weights NHWC (faster convolutions with cuDNN under AMP); feed inputs the same way."""
    return model.to(memory_format=torch.channels_last)


def create_model(pretrained: str, channels_last: bool, accelerator, sync_batchnorm: str = "ours",
                 id2label: dict | None = None, init_from=None) -> HRNetFCNForSemanticSegmentation:
    """The network as training runs it: the classes of id2label (None: Cityscapes' 19), the weights of init_from (a
    trained model's folder, see model_from_checkpoint) or else a `pretrained` backbone; sync_batchnorm: see
    apply_sync_batchnorm."""
    if init_from is not None:
        model, message = model_from_checkpoint(init_from, id2label)
        accelerator.print(message)
    else:
        model = new_model(pretrained, accelerator, id2label)
    model = apply_sync_batchnorm(model, sync_batchnorm, accelerator)
    return to_channels_last(model) if channels_last else model


def new_model(pretrained: str, accelerator, id2label: dict | None = None) -> HRNetFCNForSemanticSegmentation:
    """A fresh network for id2label's classes, its backbone from `pretrained` (a timm tag, a file, or "none")."""
    config = HRNetFCNConfig() if id2label is None else HRNetFCNConfig(id2label=dict(id2label))
    model = HRNetFCNForSemanticSegmentation(config)
    if pretrained != "none":
        with accelerator.main_process_first():  # one download into the shared cache, then everyone reads it
            try:
                info = load_pretrained_backbone(model, pretrained)
            except (FileNotFoundError, ValueError) as err:
                raise SystemExit(f"error: --pretrained_backbone: {err}") from None
        accelerator.print(f"backbone: {info['loaded']} tensors from {info['source']}")
    return model


def model_from_checkpoint(folder, id2label: dict | None = None) -> tuple[HRNetFCNForSemanticSegmentation, str]:
    """(model, one line saying what was loaded): a save_pretrained folder (e.g. a Cityscapes run's final/) as the
    start of fine-tuning on id2label's classes (None: the folder's own). Every weight is loaded, except the
    classifier (decode_head.conv_seg) when the class count differs: transformers then re-initialises it
    (ignore_mismatched_sizes, through the model's _init_weights)."""
    before = HRNetFCNConfig.from_pretrained(folder).num_labels
    labels = {} if id2label is None else {"id2label": dict(id2label), "label2id": {v: k for k, v in id2label.items()}}
    model = HRNetFCNForSemanticSegmentation.from_pretrained(folder, ignore_mismatched_sizes=True, **labels)
    after = model.config.num_labels
    if after == before:
        return model, f"--init_from {folder}: every weight loaded ({after} classes)"
    return model, (f"--init_from {folder}: {before} classes there, {after} here: the classifier "
                   "(decode_head.conv_seg) is re-initialised, every other weight loaded")


def create_sgd(parameters, lr: float, fused: bool = True) -> torch.optim.SGD:
    """The recipe's SGD. fused: one kernel for the whole update, which also skips a non-finite update on the
    device (reliability.py).

    The momentum buffers start as zeros. torch's fused SGD allocates them with empty_like at its first step and
    lets the kernel fill them; when that step is skipped (found_inf: fp16 overflow, or our non-finite guard) they
    stay uninitialised memory and the next update uses them as momentum. With zeros the first applied update is
    the one torch computes anyway (buffer = 0.9 * 0 + gradient).
    """
    parameters = list(parameters)
    optimizer = torch.optim.SGD(parameters, lr=lr, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, fused=fused)
    for p in parameters:
        # Accelerate's prepare moves the state to the parameters' device along with the model
        optimizer.state[p]["momentum_buffer"] = torch.zeros_like(p)
    return optimizer


def create_optimizer_and_scheduler(model, lr: float, max_iters: int):
    optimizer = create_sgd(model.parameters(), lr)
    # transformers' poly schedule with warmup 0 is the recipe's lr(i) = (lr - LR_END) * (1 - i / N) ** 0.9 + LR_END.
    # It is stepped once per iteration by the loop (the Accelerator is built with step_scheduler_with_optimizer=
    # False): a prepared scheduler would otherwise step num_processes times per optimizer step, and skip steps
    # whose fp16 update overflowed, drifting off the recipe's per-iteration curve.
    scheduler = get_polynomial_decay_schedule_with_warmup(optimizer, num_warmup_steps=0, num_training_steps=max_iters,
                                                          lr_end=LR_END, power=POLY_POWER)
    return optimizer, scheduler


# --------------------------------------------------------------------------------------------------------- data
class ResumableSampler(DistributedSampler):
    """torch's DistributedSampler (shuffle, drop_last) that can start `start` indices into its epoch.

    Rank r's k-th sample is entry k * P + r of one seeded permutation per epoch, so 2 processes x batch 1 see
    exactly what 1 process x batch 1 x 2 accumulation steps sees.
    """

    def __init__(self, dataset, num_replicas: int = 1, rank: int = 0, seed: int = 0):
        super().__init__(dataset, num_replicas, rank, shuffle=True, seed=seed, drop_last=True)
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        super().set_epoch(epoch)
        # the offset, not Accelerate's skip_first_batches: a resumed epoch then decodes no skipped sample and keeps
        # the one persistent DataLoader (skip_first_batches builds a second DataLoader with its own workers)
        self.start = start

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.start, None)

    def __len__(self) -> int:
        return self.num_samples - self.start


def create_sampler(dataset, accelerator, batch_size: int, seed: int, data_root) -> ResumableSampler:
    """This process's sampler; fewer samples than one batch per process is a one-line error naming the data."""
    sampler = ResumableSampler(dataset, accelerator.num_processes, accelerator.process_index, seed=seed)
    if sampler.num_samples < batch_size:
        raise SystemExit(f"error: --batch_size {batch_size} x {accelerator.num_processes} processes needs at least "
                         f"that many training images, {data_root} has {len(dataset)}")
    return sampler


def train_batches(dataset, sampler: ResumableSampler, batch_size: int, num_workers: int, first_batch: int,
                  pin_memory: bool, timeout: float = DEFAULT_LOADER_TIMEOUT):
    """Endless stream of this process's micro-batches, starting at micro-batch `first_batch` of the run.

    Epoch e's batches are the sampler's order cut into batch_size pieces (the incomplete last one dropped).
    dataset.set_epoch(e) makes the per-sample augmentation draws depend on the epoch; the datasets keep the epoch
    in shared memory, so it reaches the persistent workers before they load anything of epoch e. A worker that
    hangs for `timeout` seconds or dies is a clear error (modeling/reliability.py), not a silent hang.
    """
    per_epoch = sampler.num_samples // batch_size
    epoch, skip = divmod(first_batch, per_epoch)
    # worker seeds come from this generator, not from the global RNG, so they replay on resume too
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers, drop_last=True,
                        pin_memory=pin_memory, persistent_workers=num_workers > 0,
                        generator=torch.Generator().manual_seed(sampler.seed), **loader_kwargs(num_workers, timeout))
    while True:
        dataset.set_epoch(epoch)
        sampler.set_epoch(epoch, start=skip * batch_size)
        yield from explain_loader_errors(loader, "training data", timeout)
        epoch, skip = epoch + 1, 0


def augmentation_seed(seed: int, rank: int, iteration: int) -> int:
    # The device-side augmentation generator is reseeded every iteration from (seed, rank, iteration): its draws
    # replay exactly after a resume without saving generator state, and differ between processes.
    return (seed * 1_000_003 + rank) * 10_000_019 + iteration


def next_batch(batches, on_device, device: torch.device, generator: torch.Generator, channels_last: bool):
    """The next micro-batch as the model takes it: on the device, augmented there (fast path), NHWC if asked."""
    pixel_values, labels = on_device(batch_to_device(next(batches), device), generator)
    if channels_last:
        pixel_values = pixel_values.contiguous(memory_format=torch.channels_last)
    return pixel_values, labels


# --------------------------------------------------------------------------------------------------------- step
def training_step(model, optimizer, accelerator, guard: StepGuard, iteration: int, pixel_values, labels):
    """One micro-batch: forward with the loss, backward (AMP scaling, DDP all-reduce on the last micro-batch of an
    accumulation), the optimizer step unless the update is non-finite. The throughput benchmark times this function.

    Returns the detached loss: reading it (.item()) would make the host wait for the device every iteration.
    """
    with accelerator.accumulate(model):  # no DDP all-reduce and no optimizer step until the last micro-batch
        loss = model(pixel_values=pixel_values, labels=labels).loss
        accelerator.backward(loss)
        guard.before_optimizer_step(iteration)  # a non-finite update is not applied
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return loss.detach()


@dataclass
class TrainState:
    """Everything the loop needs to continue exactly; saved as JSON in each checkpoint's manifest."""

    iteration: int = 0
    wall_s: float = 0.0  # training wall time so far (evaluations included), summed over launches
    steady_images: int = 0  # images and seconds of the steady state (warm-up, evaluations, checkpoints excluded)
    steady_s: float = 0.0
    skipped_steps: int = 0  # updates not applied: non-finite loss/gradients, or fp16 overflow (the scaler's skips)
    best_miou: float = -1.0
    best_iteration: int | None = None
    best_metrics: dict | None = None
    final_metrics: dict | None = None
    time_to_train_s: float | None = None
    eval_log: list = field(default_factory=list)


# ------------------------------------------------------------------------------------------------------- launch
def check_launch(accelerator) -> None:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size != accelerator.num_processes:
        # torchrun/accelerate launch started several processes but Accelerate found no CUDA and fell back to
        # unrelated single-process runs writing the same files.
        raise SystemExit(f"error: launched as {world_size} processes but Accelerate runs {accelerator.num_processes}:"
                         " without GPUs set ACCELERATE_USE_CPU=1 (see accelerate_configs/cpu_2proc.yaml)")
    refuse_fp16_on_cpu(accelerator)  # results.json would say fp16 for an fp32 run


def end_processes(accelerator) -> None:
    accelerator.end_training()  # stops trackers and destroys the process group (else torchrun reports SIGABRT)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
