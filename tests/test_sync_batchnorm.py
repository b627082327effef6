"""modeling.sync_batchnorm: plain BN on one process; on 2 gloo processes, BN over the concatenated batch.

The distributed checks run in ONE pair of spawned processes (module fixture, ~10 s); each check's outcome per rank
comes back as a JSON file and one test below asserts it, so a failure names its check and carries the traceback.
"""

import json
import traceback
from collections import Counter
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from modeling.sync_batchnorm import SyncBatchNorm, convert_sync_batchnorm, revert_sync_batchnorm

COLLECTIVES = ("all_gather_single", "all_gather_into_tensor", "all_gather", "all_reduce", "broadcast",
               "reduce_scatter_tensor", "all_to_all_single", "barrier")
# aten ops that read a tensor's value on the host (or give a data-dependent shape): a device-to-host sync on CUDA.
SYNC_OPS = {"aten._local_scalar_dense", "aten.item", "aten.is_nonzero", "aten.equal", "aten.allclose",
            "aten.nonzero", "aten.nonzero_static", "aten.masked_select", "aten.unique", "aten._unique2",
            "aten.unique_consecutive", "aten.repeat_interleave", "aten.masked_scatter"}
CHANNELS, HEIGHT, WIDTH = 4, 5, 6


# ------------------------------------------------------------------------------------------------ helpers
class _CountCollectives:
    """Counts calls of the torch.distributed collectives (patched on the module, as our code looks them up)."""

    def __init__(self):
        self.calls = Counter()
        self._originals = {name: getattr(dist, name) for name in COLLECTIVES}

    def __enter__(self):
        for name, original in self._originals.items():
            def counted(*args, _name=name, _original=original, **kwargs):
                self.calls[_name] += 1
                return _original(*args, **kwargs)
            setattr(dist, name, counted)
        return self

    def __exit__(self, *exc):
        for name, original in self._originals.items():
            setattr(dist, name, original)


class _RecordOps(TorchDispatchMode):
    """Records every aten/c10d op that runs, and flags indexing with a boolean tensor."""

    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if name.startswith("aten.index") and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool
                for a in args if isinstance(a, list | tuple) for i in a):
            name = "aten.index[bool]"
        self.ops[name] += 1
        return func(*args, **(kwargs or {}))


def _batches(sizes, steps, seed, dtype=torch.float32):
    """`steps` (input, output-gradient) pairs of the concatenated batch, mean 3 and std 2 per channel."""
    generator = torch.Generator().manual_seed(seed)
    shape = (sum(sizes), CHANNELS, HEIGHT, WIDTH)
    return [((torch.randn(shape, generator=generator) * 2 + 3).to(dtype), torch.randn(shape, generator=generator))
            for _ in range(steps)]


def _pair(momentum=0.1, seed=0):
    """A reference nn.BatchNorm2d and our SyncBatchNorm with the same non-trivial weight and bias."""
    reference = nn.BatchNorm2d(CHANNELS, momentum=momentum)
    with torch.no_grad():
        reference.weight.copy_(torch.linspace(0.5, 2.0, CHANNELS))
        reference.bias.copy_(torch.linspace(-1.0, 1.0, CHANNELS))
    ours = SyncBatchNorm(CHANNELS, momentum=momentum)
    ours.load_state_dict(reference.state_dict())
    return reference, ours


def _close(actual, expected, what, atol=1e-5, rtol=1e-5):
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, check_dtype=False, msg=lambda m: f"{what}: {m}")


def _compare_training(rank, sizes, momentum=0.1, steps=3, dtype=torch.float32, autocast=False):
    """Our module on this rank's slice == nn.BatchNorm2d on the whole batch, step after step."""
    reference, ours = _pair(momentum)
    start = sum(sizes[:rank])
    local = slice(start, start + sizes[rank])
    for step, (x, grad_y) in enumerate(_batches(sizes, steps, seed=10 + len(sizes) * sizes[0], dtype=dtype)):
        x_ref = x.float().clone().requires_grad_()  # the reference normalizes the same values in fp32
        y_ref = reference(x_ref)
        (y_ref * grad_y).sum().backward()
        x_ours = x[local].clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = ours(x_ours)
        (y * grad_y[local].to(y.dtype)).sum().backward()
        assert y.dtype == x.dtype and x_ours.grad.dtype == x.dtype, (y.dtype, x_ours.grad.dtype)
        loose = {"atol": 2e-2, "rtol": 2e-2} if dtype == torch.bfloat16 else {}
        _close(y, y_ref[local], f"output, step {step}", **loose)
        _close(x_ours.grad, x_ref.grad[local], f"input gradient, step {step}", **loose)
        # DDP sums (then averages) the local weight and bias gradients: their sum is the global batch's gradient.
        for name in ("weight", "bias"):
            grad = getattr(ours, name).grad.clone()
            dist.all_reduce(grad)
            _close(grad, getattr(reference, name).grad, f"{name} gradient, step {step}", **loose)
        # The statistics are fp32 even for bf16 inputs: the running statistics match to fp32 tolerance.
        _close(ours.running_mean, reference.running_mean, f"running_mean, step {step}")
        _close(ours.running_var, reference.running_var, f"running_var, step {step}")
        assert ours.num_batches_tracked.item() == reference.num_batches_tracked.item() == step + 1
        for module in (reference, ours):
            module.zero_grad()


# ----------------------------------------------------------------------------------- the distributed checks
def check_even_batches(rank):
    _compare_training(rank, [2, 2])


def check_uneven_batches(rank):
    _compare_training(rank, [1, 3])


def check_an_empty_rank(rank):
    _compare_training(rank, [0, 3], steps=2)


def check_cumulative_momentum(rank):
    _compare_training(rank, [3, 1], momentum=None)


def check_bf16_autocast(rank):
    _compare_training(rank, [1, 3], dtype=torch.bfloat16, autocast=True)


def check_one_collective_each_way_and_none_in_eval(rank):
    _, ours = _pair()
    x = torch.randn(2, CHANNELS, HEIGHT, WIDTH, requires_grad=True)
    with _CountCollectives() as forward:
        y = ours(x)
    with _CountCollectives() as backward:
        y.sum().backward()
    ours.eval()
    with _CountCollectives() as evaluation:
        ours(x)
    assert forward.calls == Counter(all_gather_single=1), forward.calls
    assert backward.calls == Counter(all_reduce=1), backward.calls
    assert evaluation.calls == Counter(), evaluation.calls


def check_no_host_sync(rank):
    for momentum in (0.1, None):  # the cumulative average keeps its factor on the device too
        _, ours = _pair(momentum)
        x = torch.randn(1 + rank, CHANNELS, HEIGHT, WIDTH, requires_grad=True)
        with _RecordOps() as recorded:
            ours(x).square().sum().backward()
        assert recorded.ops["c10d._allgather_base_"] == 1 and recorded.ops["c10d.allreduce_"] == 1, recorded.ops
        forbidden = {op: n for op, n in recorded.ops.items() if op in SYNC_OPS or op == "aten.index[bool]"}
        assert not forbidden, f"host-syncing ops: {forbidden}"


def check_ddp_two_processes_batch_one_equals_one_process_batch_two(rank):
    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, CHANNELS, 3, padding=1), nn.BatchNorm2d(CHANNELS), nn.ReLU(),
                             nn.Conv2d(CHANNELS, 2, 1))
    single, ddp = model(), nn.parallel.DistributedDataParallel(convert_sync_batchnorm(model()))
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (single, ddp)]
    generator = torch.Generator().manual_seed(1)
    for _ in range(3):
        images, targets = torch.randn(2, 3, 8, 8, generator=generator), torch.randn(2, 2, 8, 8, generator=generator)
        for net, x, t in ((single, images, targets), (ddp, images[rank:rank + 1], targets[rank:rank + 1])):
            nn.functional.mse_loss(net(x), t).backward()  # a mean over the local batch: DDP averages over ranks
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()
    for (name, expected), actual in zip(single.state_dict().items(), ddp.module.state_dict().values(), strict=True):
        _close(actual, expected, name)


def check_float64_network_two_processes_batch_one_equals_one_process_batch_two(rank):
    """The whole network in float64, 3 steps of the recipe's SGD (lr 0.001) on 64x128: our SyncBN on 2 processes x
    batch 1 inside DDP == plain BN on 1 process x batch 2, to 1e-10 (weights and running statistics).

    Measured (float64): parameters differ by 2e-16 at most (relative L2 1e-17), running statistics by 1e-11 relative:
    float64 rounding, so the formulas (forward, backward, running statistics) are those of the global batch. The
    same runs in fp32 differ by 1.5e-5 at most, relative L2 1.0e-6: 17 times fp32's unit roundoff (6e-8), where
    float64's 1e-17 is 0.1 times its own (1.1e-16); up to 21% of a BN bias still near its initial 0 and 12% of a
    running statistic. That is fp32 rounding amplified by this random-init network, not a defect (at 128x256
    crops: 9.7e-6, relative L2 5.8e-7, 12% of a bias), and what tests/test_multiprocess_training.py bounds end
    to end in fp32.
    """
    from modeling import HRNetFCNConfig, HRNetFCNForSemanticSegmentation
    from modeling.training import MOMENTUM, WEIGHT_DECAY

    def network():
        torch.manual_seed(0)
        return HRNetFCNForSemanticSegmentation(HRNetFCNConfig()).double()
    single = network()
    ddp = nn.parallel.DistributedDataParallel(convert_sync_batchnorm(network()), broadcast_buffers=False)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.001, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
                  for m in (single, ddp)]
    generator = torch.Generator().manual_seed(1)
    for _ in range(3):
        images = torch.randn(2, 3, 64, 128, generator=generator, dtype=torch.float64)
        labels = torch.randint(0, 19, (2, 64, 128), generator=generator)
        single(pixel_values=images, labels=labels).loss.backward()
        # the loss is a mean over the local batch (same pixel count per rank): DDP's average is the global mean
        ddp(pixel_values=images[rank:rank + 1], labels=labels[rank:rank + 1]).loss.backward()
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()
    for (name, expected), actual in zip(single.state_dict().items(), ddp.module.state_dict().values(), strict=True):
        torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12, msg=name)


CHECKS = [name for name in dict(globals()) if name.startswith("check_")]


def _worker(rank, world_size, init_file, results_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=60))
    results = {}
    try:
        for name in CHECKS:
            try:
                globals()[name](rank)
                results[name] = "ok"
            except Exception:  # noqa: BLE001 - reported to the parent test, which fails with it
                results[name] = traceback.format_exc()
                break  # the other rank may now wait in a collective: stop rather than mismatch the next check
    finally:
        (results_dir / f"rank{rank}.json").write_text(json.dumps(results))
        try:  # both ranks leave together: a rank that tears gloo down first can abort the other ("terminate called")
            dist.barrier()
        finally:
            dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    directory = tmp_path_factory.mktemp("syncbn")
    mp.start_processes(_worker, args=(2, directory / "init", directory), nprocs=2, start_method="spawn")
    return [json.loads((directory / f"rank{rank}.json").read_text()) for rank in range(2)]


@pytest.mark.parametrize("check", CHECKS)
def test_two_gloo_processes(two_rank_results, check):
    for rank, results in enumerate(two_rank_results):
        assert check in results, f"rank {rank} did not run {check} (an earlier check failed)"
        assert results[check] == "ok", f"rank {rank}:\n{results[check]}"


# ------------------------------------------------------------------------------------------- one process
@pytest.fixture
def no_collectives(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("a collective ran on one process")
    for name in COLLECTIVES:
        monkeypatch.setattr(dist, name, forbidden)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_one_process_is_plain_batchnorm(no_collectives, momentum):
    reference, ours = _pair(momentum)
    for step, (x, grad_y) in enumerate(_batches([3], steps=2, seed=3)):
        x_ref, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
        y_ref, y = reference(x_ref), ours(x_ours)
        (y_ref * grad_y).sum().backward()
        (y * grad_y).sum().backward()
        for actual, expected, what in [(y, y_ref, "output"), (x_ours.grad, x_ref.grad, "input gradient"),
                                       (ours.weight.grad, reference.weight.grad, "weight gradient"),
                                       (ours.bias.grad, reference.bias.grad, "bias gradient")]:
            _close(actual, expected, f"{what}, step {step}")
    assert ours.state_dict().keys() == reference.state_dict().keys()
    for name, value in reference.state_dict().items():
        _close(ours.state_dict()[name], value, name)
    reference.eval(), ours.eval()
    _close(ours(x), reference(x), "eval output")


def test_a_process_group_of_one_is_plain_batchnorm(no_collectives, tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        reference, ours = _pair()
        x = _batches([2], steps=1, seed=4)[0][0]
        _close(ours(x), reference(x), "output")
        _close(ours.running_var, reference.running_var, "running_var")
    finally:
        dist.destroy_process_group()


def test_input_must_have_a_channel_dimension():
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        SyncBatchNorm(4)(torch.randn(4))


# ------------------------------------------------------------------------------------------------ conversion
def _small_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4),
                          nn.Sequential(nn.Conv2d(4, 6, 1), nn.SyncBatchNorm(6, momentum=None, eps=1e-3)),
                          nn.BatchNorm2d(6, affine=False), nn.BatchNorm1d(5))
    for module in model.modules():  # non-default statistics, so that the values are compared, not only the keys
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_mean.uniform_(), module.running_var.uniform_(1, 2), module.num_batches_tracked.fill_(7)
    model[1].weight.requires_grad_(False)
    return model.eval()


def test_convert_keeps_state_dict_parameters_and_settings():
    model = _small_model()
    before = {name: value.clone() for name, value in model.state_dict().items()}
    weight = model[1].weight
    converted = convert_sync_batchnorm(model, process_group="a group")
    assert [type(m) for m in (converted[1], converted[2][1], converted[3], converted[4])] == [
        SyncBatchNorm, SyncBatchNorm, SyncBatchNorm, nn.BatchNorm1d]  # 2d and torch's SyncBN; 1d is left alone
    assert converted[1].weight is weight and not weight.requires_grad and not converted[1].training
    assert converted[2][1].momentum is None and converted[2][1].eps == 1e-3 and not converted[3].affine
    assert converted[1].process_group == "a group"
    assert converted.state_dict().keys() == before.keys()
    for name, value in converted.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert convert_sync_batchnorm(converted)[1] is converted[1]  # ours are not converted again
    reverted = revert_sync_batchnorm(converted)
    assert sum(type(m) is nn.BatchNorm2d for m in reverted.modules()) == 3
    assert all(torch.equal(value, before[name]) for name, value in reverted.state_dict().items())


def test_convert_hrnet_fcn_converts_its_306_batchnorms_and_keeps_its_state_dict():
    from modeling import HRNetFCNConfig, HRNetFCNForSemanticSegmentation
    torch.manual_seed(0)
    model = HRNetFCNForSemanticSegmentation(HRNetFCNConfig())
    before = model.state_dict()
    converted = convert_sync_batchnorm(model)
    assert sum(type(m) is SyncBatchNorm for m in converted.modules()) == 306
    assert not any(type(m) is nn.BatchNorm2d for m in converted.modules())
    after = converted.state_dict()
    assert list(after) == list(before)
    assert all(after[name] is value or torch.equal(after[name], value) for name, value in before.items())
