"""torch.compile as `--compile` runs it (Accelerate's dynamo_backend="inductor"), on the CPU: graph breaks,
recompiles, and training compiled against eager.

- One process, the whole network: TorchDynamo's capture (backend "eager": the graph inductor would be given,
  without inductor's code generation) over 3 SGD steps: one graph, no graph break, no recompile, and the losses
  and weights of eager training (tolerance 1e-6: the captured graph runs the same aten ops; measured: equal).
  Inductor itself on the whole network compiles for ~6 min on this 2-core machine, idle (19 min with other jobs;
  BENCHMARKS.md, "torch.compile on the CPU"), far beyond the suite's budget: inductor runs on the small network
  below.
- 2 gloo processes, a small network with our SyncBN inside DDP, the module inside DDP compiled with inductor and
  fullgraph=True (a graph break is an error; Accelerate's torch.compile of the DDP model compiles the same module,
  DDP's wrapper running eagerly around it): dynamo traces SyncBN's all_gather and all_reduce as functional
  collectives, forward and backward, and after 3 SGD steps the losses and weights equal eager 2-process training to
  rtol 1e-4 / atol 1e-6 (fp32; inductor fuses and reorders the arithmetic; measured: losses 8e-8 relative,
  weights 1.2e-7 at most).
"""

import json
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch._dynamo.utils import counters

from modeling import HRNetFCNConfig, HRNetFCNForSemanticSegmentation, segmentation_loss
from modeling.sync_batchnorm import SyncBatchNorm, convert_sync_batchnorm
from modeling.training import MOMENTUM, WEIGHT_DECAY

pytestmark = pytest.mark.usefixtures("one_thread")
STEPS, LR = 3, 0.01


def _batches(batch_size: int, height: int, width: int, seed: int = 1) -> list:
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch_size, 3, height, width, generator=generator),
             torch.randint(0, 19, (batch_size, height, width), generator=generator)) for _ in range(STEPS)]


def _train(step_model, parameters, batches) -> list[float]:
    """STEPS steps of the recipe's SGD; returns the losses. step_model(x, y) -> loss."""
    optimizer = torch.optim.SGD(parameters, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    losses = []
    for x, y in batches:
        loss = step_model(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def _compile_report() -> dict:
    """Graph breaks (reason -> count) and graphs compiled since the counters were cleared."""
    return {"graph_breaks": dict(counters["graph_break"]), "graphs": counters["stats"]["unique_graphs"]}


def _start_counting() -> None:
    torch._dynamo.reset()  # nothing cached from an earlier test: every graph below is compiled here
    counters.clear()


# ------------------------------------------------------------------------------------------------ one process
def _network() -> HRNetFCNForSemanticSegmentation:
    torch.manual_seed(0)
    return HRNetFCNForSemanticSegmentation(HRNetFCNConfig()).train()


def test_the_network_compiles_to_one_graph_without_breaks_or_recompiles():
    batches = _batches(2, 64, 128)
    eager, compiled = _network(), _network()
    eager_losses = _train(lambda x, y: eager(pixel_values=x, labels=y).loss, eager.parameters(), batches)
    _start_counting()
    captured = torch.compile(compiled, backend="eager")
    compiled_losses = _train(lambda x, y: captured(pixel_values=x, labels=y).loss, compiled.parameters(), batches)
    report = _compile_report()
    assert report == {"graph_breaks": {}, "graphs": 1}, report  # 3 steps, one graph: no recompile either
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-6, abs=0)
    for (name, expected), actual in zip(eager.state_dict().items(), compiled.state_dict().values(), strict=True):
        torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-7, msg=name)


def test_throughput_reports_dynamos_graphs_and_graph_breaks():
    from modeling.benchmarks.throughput import compile_figures

    def two_graphs(x):
        x = x + 1
        torch._dynamo.graph_break()  # what a .item() or a print in the model would cost
        return x * 2

    _start_counting()
    torch.compile(two_graphs, backend="eager")(torch.ones(2))
    figures = compile_figures()
    assert figures["graphs"] == 2 and figures["graph_breaks"] == 1, figures
    assert figures["graph_break_reasons"] == ["Call to `torch._dynamo.graph_break()`"], figures


# ----------------------------------------------------------------------------------- 2 gloo processes, inductor
def _small_network() -> nn.Module:
    """conv-BN-ReLU twice and a classifier: the layers of the network that SyncBN and inductor change."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 19, 1))


def _train_two_processes(rank: int, compile_model: bool) -> tuple[list, dict]:
    """This rank's losses and final weights: 2 processes x batch 1, our SyncBN, DDP (averaged gradients)."""
    model = nn.parallel.DistributedDataParallel(convert_sync_batchnorm(_small_network()), broadcast_buffers=False)
    assert sum(isinstance(m, SyncBatchNorm) for m in model.modules()) == 2
    if compile_model:
        # The module inside DDP, compiled in place with fullgraph=True: a graph break in it (our SyncBN's
        # collectives included) is an error. torch.compile(DDP model), as Accelerate calls it, compiles the same
        # module (with the same DDP bucketing of the graph) and adds DDP's own wrapper breaks (3 in torch 2.14,
        # by design: DDP's forward runs eagerly around the compiled module).
        model.module.compile(backend="inductor", fullgraph=True)
    batches = [(x[rank:rank + 1], y[rank:rank + 1]) for x, y in _batches(2, 32, 64)]
    losses = _train(lambda x, y: segmentation_loss(model(x), y), model.parameters(), batches)
    return losses, model.module.state_dict()


def check_inductor_with_sync_batchnorm(rank: int) -> dict:
    eager_losses, eager_weights = _train_two_processes(rank, compile_model=False)
    _start_counting()
    losses, weights = _train_two_processes(rank, compile_model=True)
    report = _compile_report()
    assert report["graph_breaks"] == {}, report
    assert losses == pytest.approx(eager_losses, rel=1e-4), (losses, eager_losses)
    for name, expected in eager_weights.items():
        torch.testing.assert_close(weights[name], expected, rtol=1e-4, atol=1e-6, msg=name)
    loss_diff = max(abs(a - b) / abs(b) for a, b in zip(losses, eager_losses, strict=True))
    weight_diff = max((weights[k].double() - v.double()).abs().max().item() for k, v in eager_weights.items())
    return {**report, "loss_rel_diff": loss_diff, "weight_max_abs_diff": weight_diff}


def _worker(rank, init_file, results_dir):
    torch.set_num_threads(1)
    torch._inductor.config.compile_threads = 1  # no compile worker pool: 2 cores for 2 processes
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=300))
    try:
        try:
            result = {"ok": check_inductor_with_sync_batchnorm(rank)}
        except Exception:  # noqa: BLE001 - reported to the parent test, which fails with it
            result = {"error": traceback.format_exc()}
        (results_dir / f"rank{rank}.json").write_text(json.dumps(result))
        dist.barrier()  # both ranks leave together (see tests/test_sync_batchnorm.py)
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_with_sync_batchnorm_compile_with_inductor_and_train_as_eager(tmp_path):
    mp.start_processes(_worker, args=(tmp_path / "init", tmp_path), nprocs=2, start_method="spawn")
    for rank in range(2):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert "ok" in result, f"rank {rank}:\n{result['error']}"
        print(f"rank {rank}: {result['ok']}")  # the measured differences, for the docstring (pytest -s)
