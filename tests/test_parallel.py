"""Deterministic data parallelism (uge_hf.parallel): one step, the same bytes on 1 or N processes."""

import datetime
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from uge_hf.data import load_tensors
from uge_hf.models import create_model
from uge_hf.parallel import Ranks, data_parallel_gradients, share_out
from uge_hf.training import to_float


@pytest.fixture(scope="module")
def batch(cifar):
    images, labels = load_tensors(cifar["train"], "img", "label", 3, rows=range(96), verbose=False)
    return to_float(images, torch.device("cpu")), labels


def summed_cross_entropy(model, x, y, parts):
    xs, ys = x.tensor_split(parts), y.tensor_split(parts)
    return lambda k: F.cross_entropy(model(xs[k]), ys[k], reduction="sum") / len(y)


def test_micro_batch_gradients_sum_to_the_batch_gradient(batch):
    x, y = batch
    torch.manual_seed(0)
    model = create_model("mixer-tiny")  # no batch norm: micro-batches change nothing but the sum's order
    loss = data_parallel_gradients(model, summed_cross_entropy(model, x, y, 4), 4)
    split = [p.grad.clone() for p in model.parameters()]
    whole = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
    assert loss == pytest.approx(F.cross_entropy(model(x), y).item(), rel=1e-5)
    for a, b in zip(split, whole):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_batch_norm_statistics_are_the_mean_over_micro_batches(batch):
    x, y = batch
    torch.manual_seed(0)
    model = create_model("resnet-tiny").train()
    bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    before = bn.running_mean.clone()
    first_conv_out = []
    hook = bn.register_forward_hook(lambda m, inp, out: first_conv_out.append(inp[0].detach().mean((0, 2, 3))))
    data_parallel_gradients(model, summed_cross_entropy(model, x, y, 3), 3)
    hook.remove()
    expected = (1 - bn.momentum) * before + bn.momentum * torch.stack(first_conv_out).mean(0)
    torch.testing.assert_close(bn.running_mean, expected, rtol=1e-5, atol=1e-6)
    assert int(bn.num_batches_tracked) == 1, "one step, one count"


def test_more_processes_than_micro_batches_is_refused(batch):
    x, y = batch
    model = create_model("convnet")
    with pytest.raises(ValueError, match=r"micro_batches=4.*ProtectConfig\(micro_batches=5\)"):
        data_parallel_gradients(model, summed_cross_entropy(model, x, y, 4), 4, Ranks(0, 5))


def _step(rank: int, world: int, port: int, x, y, out: str) -> None:
    torch.set_num_threads(1)  # equal threads per process: kernels' own reductions depend on it
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = create_model("resnet-tiny").train()  # batch norm: statistics must agree too
    loss = data_parallel_gradients(model, summed_cross_entropy(model, x, y, 4), 4, Ranks.current())
    torch.save({"loss": loss, "grads": [p.grad for p in model.parameters()], "buffers": list(model.buffers())}, f"{out}/{world}-{rank}.pt")
    if world > 1:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("world", [2, 3])
def test_gloo_processes_give_the_bytes_of_one(batch, tmp_path, world):
    x, y = batch
    port = free_port()
    mp.spawn(_step, args=(1, port, x, y, str(tmp_path)), nprocs=1)
    mp.spawn(_step, args=(world, port, x, y, str(tmp_path)), nprocs=world)
    one = torch.load(tmp_path / "1-0.pt")
    for rank in range(world):
        other = torch.load(tmp_path / f"{world}-{rank}.pt")
        assert other["loss"] == one["loss"]
        assert all(torch.equal(a, b) for a, b in zip(one["grads"] + one["buffers"], other["grads"] + other["buffers"]))


def _share(rank: int, world: int, port: int, failing: int, out: str) -> None:
    # A short timeout: a process left waiting fails the test within a minute instead of hanging it.
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))

    def work(k: int):
        if k == failing:
            raise ValueError(f"job {k} is broken")
        if k == -failing:
            return lambda: k  # does not pickle
        return torch.full((2,), float(k))

    try:
        outcome = [t.tolist() for t in share_out(7, work, Ranks.current())]
    except Exception as error:
        outcome = f"{type(error).__name__}: {error}"
    torch.save(outcome, f"{out}/{rank}.pt")
    dist.destroy_process_group()


def test_shared_out_jobs_come_back_in_order_and_a_failed_job_fails_every_process(tmp_path):
    mp.spawn(_share, args=(3, free_port(), 99, str(tmp_path)), nprocs=3)
    assert all(torch.load(tmp_path / f"{r}.pt") == [[float(k)] * 2 for k in range(7)] for r in range(3))
    # Job 4 is process 1's (4 % 3): it raises its own error, the others say whose it was, none waits.
    mp.spawn(_share, args=(3, free_port(), 4, str(tmp_path)), nprocs=3)
    assert torch.load(tmp_path / "1.pt") == "ValueError: job 4 is broken"
    for rank in (0, 2):
        assert torch.load(tmp_path / f"{rank}.pt") == \
            "RuntimeError: process 1 failed its share of the work (ValueError: job 4 is broken); see its traceback"
    # A result that does not pickle fails the same way (job 5: process 2's).
    mp.spawn(_share, args=(3, free_port(), -5, str(tmp_path)), nprocs=3)
    assert "pickle" in torch.load(tmp_path / "2.pt").lower()
    assert all(torch.load(tmp_path / f"{r}.pt").startswith("RuntimeError: process 2 failed its share") for r in (0, 1))
