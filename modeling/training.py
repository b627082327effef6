"""What a training iteration is made of, shared by scripts/train.py and the throughput benchmark (which times it).

    model = create_model(pretrained, channels_last, accelerator, sync_batchnorm=True)
    optimizer, scheduler = create_optimizer_and_scheduler(model, lr, max_iters)
    batches = train_batches(dataset, ResumableSampler(dataset, num_processes, rank, seed), batch_size, ...)
    pixel_values, labels = next_batch(batches, on_device, device, generator, channels_last)
    loss = training_step(model, optimizer, accelerator, guard, iteration, pixel_values, labels)
"""

import itertools
import os
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler
from transformers import get_polynomial_decay_schedule_with_warmup

from data import batch_to_device
from modeling.hrnet_fcn import HRNetFCNConfig, HRNetFCNForSemanticSegmentation, load_pretrained_backbone
from modeling.reliability import DEFAULT_LOADER_TIMEOUT, StepGuard, explain_loader_errors, loader_kwargs

# The recipe (docs/recipe.md section 5): SGD on every parameter, poly decay to LR_END per iteration, no warmup.
MOMENTUM, WEIGHT_DECAY, LR_END, POLY_POWER = 0.9, 5e-4, 1e-4, 0.9


# -------------------------------------------------------------------------------------------------------- model
def convert_to_sync_batchnorm(model: nn.Module, accelerator) -> nn.Module:
    """BatchNorm -> SyncBatchNorm when training on several CUDA processes (docs/recipe.md section 5), else unchanged.

    Call it before `accelerator.prepare` (DDP must wrap the converted modules). SyncBatchNorm exists on CUDA only,
    and with one process it would only add overhead, so every other case is a no-op. The state dict keys stay the
    same, so checkpoints load either way.
    """
    if accelerator.device.type == "cuda" and accelerator.num_processes > 1:
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def to_channels_last(model: nn.Module) -> nn.Module:
    """Store conv weights NHWC (faster convolutions with cuDNN under AMP); feed inputs the same way."""
    return model.to(memory_format=torch.channels_last)


def create_model(pretrained: str, channels_last: bool, accelerator,
                 sync_batchnorm: bool = True) -> HRNetFCNForSemanticSegmentation:
    """The network as training runs it; sync_batchnorm=False keeps per-process BN on several GPUs too (the
    throughput benchmark measures SyncBN's cost that way)."""
    model = HRNetFCNForSemanticSegmentation(HRNetFCNConfig())
    if pretrained != "none":
        with accelerator.main_process_first():  # one download into the shared cache, then everyone reads it
            try:
                info = load_pretrained_backbone(model, pretrained)
            except (FileNotFoundError, ValueError) as err:
                raise SystemExit(f"error: --pretrained_backbone: {err}") from None
        accelerator.print(f"backbone: {info['loaded']} tensors from {info['source']}")
    if sync_batchnorm:
        model = convert_to_sync_batchnorm(model, accelerator)  # SyncBN only for several CUDA processes
    return to_channels_last(model) if channels_last else model


def create_optimizer_and_scheduler(model, lr: float, max_iters: int):
    # fused: one kernel for the whole update, which also skips a non-finite update on the device (reliability.py)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, fused=True)
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
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        # Accelerate has no fp16 autocast on the CPU and silently runs fp32: results.json would say fp16
        raise SystemExit("error: the Accelerate config asks for mixed_precision fp16, which runs on GPUs only (on "
                         "the CPU Accelerate would silently train in fp32): use 'no' or 'bf16' "
                         "(accelerate_configs/cpu.yaml)")


def end_processes(accelerator) -> None:
    accelerator.end_training()  # stops trackers and destroys the process group (else torchrun reports SIGABRT)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
