"""GlobalBatchNorm1d against torch's BatchNorm1d, in one process and on two gloo ranks on 127.0.0.1.

The two-rank test starts the ranks with ``torch.multiprocessing.spawn``. Each rank normalises its share of one global
batch and writes its results to a file, and the test compares them with ``nn.BatchNorm1d`` on the whole batch in the
pytest process.
"""

import pytest
import torch
import torch.distributed as dist
from torch import nn

from composer_maect.models.global_batchnorm import GlobalBatchNorm1d, convert_to_global_batchnorm

from .gloo import spawn_ranks

WORLD_SIZE = 2
CHANNELS = 5
LOCAL_BATCH = 4
GLOBAL_BATCH = WORLD_SIZE * LOCAL_BATCH
# Unequal shares of one global batch of 8 rows: the statistics must still cover all 8.
UNEVEN_ROWS = (3, 5)
# Channel means far from zero relative to the spread, where E[x^2] - E[x]^2 in float32 would lose digits.
CHANNEL_OFFSETS = torch.tensor([0.0, 2.0, -5.0, 30.0, 100.0])


def seeded_inputs(rows: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, CHANNELS, generator=generator) * torch.linspace(0.5, 2.0, CHANNELS) + CHANNEL_OFFSETS


def seeded_affine(module: nn.BatchNorm1d, seed: int = 3) -> nn.BatchNorm1d:
    """Give ``module`` non-default weight and bias, so that the affine part is tested too."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        module.weight.copy_(1 + 0.5 * torch.randn(CHANNELS, generator=generator))
        module.bias.copy_(torch.randn(CHANNELS, generator=generator))
    return module


def batchnorm_pair(**kwargs) -> tuple[nn.BatchNorm1d, GlobalBatchNorm1d]:
    reference = nn.BatchNorm1d(CHANNELS, **kwargs)
    module = GlobalBatchNorm1d(CHANNELS, **kwargs)
    if reference.affine:
        seeded_affine(reference)
        seeded_affine(module)
    return reference, module


def square_loss(output: torch.Tensor, rows: slice = slice(None)) -> torch.Tensor:
    """Compare ``output`` with ``rows`` of a fixed target, averaged, so the loss of a whole batch is the mean of the
    losses of equal shares of it."""
    generator = torch.Generator().manual_seed(4)
    target = torch.randn(GLOBAL_BATCH, CHANNELS, generator=generator)
    return ((output - target[rows]) ** 2).mean()


# ---------------------------------------------------------------------------------------------------------------------
# One process: GlobalBatchNorm1d is nn.BatchNorm1d


@pytest.mark.parametrize(
    'kwargs',
    [
        {},
        {'momentum': None},
        {'momentum': 0.3, 'eps': 1e-3},
        {'affine': False},
        {'track_running_stats': False},
    ],
    ids=['default', 'cumulative-average', 'momentum-eps', 'no-affine', 'no-running-stats'],
)
def test_single_process_equals_batchnorm1d(kwargs):
    reference, module = batchnorm_pair(**kwargs)

    for step in range(3):
        inputs = seeded_inputs(GLOBAL_BATCH, seed=step)
        reference_inputs = inputs.clone().requires_grad_()
        module_inputs = inputs.clone().requires_grad_()
        reference_out = reference(reference_inputs)
        module_out = module(module_inputs)
        square_loss(reference_out).backward()
        square_loss(module_out).backward()

        torch.testing.assert_close(module_out, reference_out, rtol=0, atol=0)
        torch.testing.assert_close(module_inputs.grad, reference_inputs.grad, rtol=0, atol=0)

    for name, value in reference.state_dict().items():
        torch.testing.assert_close(module.state_dict()[name], value, rtol=0, atol=0, msg=name)
    for (name, param), reference_param in zip(module.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(param.grad, reference_param.grad, rtol=0, atol=0, msg=name)

    reference.eval()
    module.eval()
    inputs = seeded_inputs(GLOBAL_BATCH, seed=10)
    torch.testing.assert_close(module(inputs), reference(inputs), rtol=0, atol=0)


def test_single_process_running_stats_move():
    reference, module = batchnorm_pair()
    module(seeded_inputs(GLOBAL_BATCH, seed=0))
    reference(seeded_inputs(GLOBAL_BATCH, seed=0))

    assert int(module.num_batches_tracked) == 1
    assert not torch.equal(module.running_mean, torch.zeros(CHANNELS))
    torch.testing.assert_close(module.running_var, reference.running_var, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------------
# convert_to_global_batchnorm


def batchnorm_with_state(requires_grad: bool = True) -> nn.BatchNorm1d:
    module = seeded_affine(nn.BatchNorm1d(CHANNELS, eps=1e-3, momentum=0.2))
    module(seeded_inputs(GLOBAL_BATCH, seed=0))
    module(seeded_inputs(GLOBAL_BATCH, seed=1))
    module.requires_grad_(requires_grad)
    return module


def test_convert_keeps_state_and_settings():
    original = batchnorm_with_state()
    expected_state = {name: value.clone() for name, value in original.state_dict().items()}
    original.eval()

    converted = convert_to_global_batchnorm(original)

    assert type(converted) is GlobalBatchNorm1d
    assert converted is not original
    assert not converted.training
    assert (converted.num_features, converted.eps, converted.momentum) == (CHANNELS, 1e-3, 0.2)
    assert converted.affine
    assert converted.track_running_stats
    assert converted.state_dict().keys() == expected_state.keys()
    for name, value in expected_state.items():
        torch.testing.assert_close(converted.state_dict()[name], value, rtol=0, atol=0, msg=name)
    assert int(converted.num_batches_tracked) == 2


def test_convert_keeps_parameter_objects():
    original = batchnorm_with_state()
    optimizer = torch.optim.SGD(original.parameters(), lr=0.1)

    converted = convert_to_global_batchnorm(original)

    assert converted.weight is original.weight
    assert converted.bias is original.bias
    assert converted.running_mean is original.running_mean
    # An optimizer built before the conversion still updates the converted module.
    square_loss(converted(seeded_inputs(GLOBAL_BATCH, seed=2))).backward()
    before = converted.weight.detach().clone()
    optimizer.step()
    assert not torch.equal(converted.weight.detach(), before)


def test_convert_keeps_frozen_parameters_frozen():
    # An EMA target copy is frozen before the conversion and must get no gradient and no optimizer slot after it.
    model = nn.Sequential(nn.Linear(3, CHANNELS), batchnorm_with_state(requires_grad=False))
    model[0].requires_grad_(False)

    converted = convert_to_global_batchnorm(model)

    assert converted is model
    assert type(model[1]) is GlobalBatchNorm1d
    assert [name for name, param in model.named_parameters() if param.requires_grad] == []


def test_convert_nested_modules():
    model = nn.Sequential(
        nn.Linear(3, CHANNELS),
        nn.BatchNorm1d(CHANNELS),
        nn.Sequential(nn.ReLU(), nn.BatchNorm1d(CHANNELS, affine=False, track_running_stats=False)),
        nn.BatchNorm2d(CHANNELS),
    )
    model.train()

    convert_to_global_batchnorm(model)

    assert type(model[1]) is GlobalBatchNorm1d
    assert type(model[2][1]) is GlobalBatchNorm1d
    assert model[2][1].weight is None
    assert model[2][1].running_mean is None
    assert model[2][1].training
    # Only 1-D batch norms are converted.
    assert type(model[3]) is nn.BatchNorm2d


def test_convert_leaves_global_batchnorm_alone():
    module = GlobalBatchNorm1d(CHANNELS)
    assert convert_to_global_batchnorm(module) is module


# ---------------------------------------------------------------------------------------------------------------------
# Two gloo ranks on 127.0.0.1


def two_rank_worker(process_rank: int) -> dict:
    """Normalise this rank's share of the global batch, equal and unequal, and backpropagate the equal one."""
    module = seeded_affine(GlobalBatchNorm1d(CHANNELS))
    rows = slice(process_rank * LOCAL_BATCH, (process_rank + 1) * LOCAL_BATCH)
    inputs = seeded_inputs(GLOBAL_BATCH, seed=0)[rows].clone().requires_grad_()
    output = module(inputs)
    square_loss(output, rows).backward()

    # DDP averages parameter gradients over ranks, so do the same here.
    param_grads = {}
    for name, param in module.named_parameters():
        grad = param.grad.clone()
        dist.all_reduce(grad)
        param_grads[name] = grad / WORLD_SIZE
    running = {name: buffer.clone() for name, buffer in module.named_buffers()}

    module.eval()
    eval_output = module(seeded_inputs(GLOBAL_BATCH, seed=10)[rows])
    module.train()

    start = sum(UNEVEN_ROWS[:process_rank])
    uneven_rows = slice(start, start + UNEVEN_ROWS[process_rank])
    with torch.no_grad():
        uneven_output = seeded_affine(GlobalBatchNorm1d(CHANNELS))(seeded_inputs(GLOBAL_BATCH, seed=0)[uneven_rows])

    return {
        'output': output.detach(),
        'input_grad': inputs.grad,
        'param_grads': param_grads,
        'running': running,
        'eval_output': eval_output.detach(),
        'uneven_output': uneven_output,
    }


def test_two_ranks_match_global_batch(tmp_path):
    results = spawn_ranks(two_rank_worker, tmp_path, WORLD_SIZE)

    reference = seeded_affine(nn.BatchNorm1d(CHANNELS))
    inputs = seeded_inputs(GLOBAL_BATCH, seed=0).requires_grad_()
    output = reference(inputs)
    square_loss(output).backward()
    reference_running = {name: buffer.clone() for name, buffer in reference.named_buffers()}
    reference.eval()
    eval_output = reference(seeded_inputs(GLOBAL_BATCH, seed=10))
    with torch.no_grad():
        uneven_output = seeded_affine(nn.BatchNorm1d(CHANNELS))(seeded_inputs(GLOBAL_BATCH, seed=0))

    tolerance = {'rtol': 1e-5, 'atol': 1e-5}
    for process_rank, result in enumerate(results):
        rows = slice(process_rank * LOCAL_BATCH, (process_rank + 1) * LOCAL_BATCH)
        torch.testing.assert_close(result['output'], output[rows].detach(), **tolerance)
        # Each rank's loss is the mean over its rows, so the one-process loss is the mean over ranks and its input
        # gradient is each rank's input gradient divided by the number of ranks.
        torch.testing.assert_close(result['input_grad'] / WORLD_SIZE, inputs.grad[rows], **tolerance)
        for name, param in reference.named_parameters():
            torch.testing.assert_close(result['param_grads'][name], param.grad, **tolerance, msg=name)
        for name, value in reference_running.items():
            torch.testing.assert_close(result['running'][name], value, **tolerance, msg=name)
        torch.testing.assert_close(result['eval_output'], eval_output[rows].detach(), **tolerance)

        start = sum(UNEVEN_ROWS[:process_rank])
        uneven_rows = slice(start, start + UNEVEN_ROWS[process_rank])
        torch.testing.assert_close(result['uneven_output'], uneven_output[uneven_rows], **tolerance)
