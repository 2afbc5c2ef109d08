"""Two gloo processes on 127.0.0.1 against one process: the NNCLR loss, its gradients and the queue must agree.

Each test starts two ranks with ``torch.multiprocessing.spawn``. The ranks write their results to files, and the test
compares them with a run of the same global batch in the pytest process itself.
"""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from composer_maect.distributed import all_gather_no_grad, all_gather_with_grad, rank, world_size
from composer_maect.losses import nnclr_loss
from composer_maect.models.queue import NNQueue

from .gloo import spawn_ranks

WORLD_SIZE = 2
LOCAL_BATCH = 4
GLOBAL_BATCH = LOCAL_BATCH * WORLD_SIZE
IN_DIM = 6
DIM = 8
QUEUE_SIZE = 2 * GLOBAL_BATCH
TEMPERATURE = 0.2


# ---------------------------------------------------------------------------------------------------------------------
# One training step: queue warm-up, lookup, loss, backward, accuracy, enqueue, and one more enqueue that wraps around.


def global_data():
    generator = torch.Generator().manual_seed(0)
    return {
        'features0': torch.randn(GLOBAL_BATCH, IN_DIM, generator=generator),
        'features1': torch.randn(GLOBAL_BATCH, IN_DIM, generator=generator),
        'earlier': F.normalize(torch.randn(GLOBAL_BATCH, DIM, generator=generator), dim=1),
        'later': F.normalize(torch.randn(GLOBAL_BATCH, DIM, generator=generator), dim=1),
        'ids': torch.arange(GLOBAL_BATCH) + 100,
        'labels': torch.randint(0, 3, (GLOBAL_BATCH,), generator=generator),
    }


def run_step(rows: slice) -> dict:
    """Run one step on ``rows`` of the global batch: all of it in one process, this rank's share in several."""
    data = {name: tensor[rows] for name, tensor in global_data().items()}
    predictor = nn.Linear(IN_DIM, DIM)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(1)
        predictor.weight.copy_(torch.randn(DIM, IN_DIM, generator=generator))
        predictor.bias.copy_(torch.randn(DIM, generator=generator))
    queue = NNQueue(QUEUE_SIZE, DIM, seed=2)

    # The same images from an earlier epoch: the lookup must skip them because their ids match.
    queue.enqueue(data['earlier'], data['ids'], data['labels'])

    predicted0 = predictor(data['features0'])
    predicted1 = predictor(data['features1'])
    predicted0.retain_grad()
    predicted1.retain_grad()
    projected0 = F.normalize(predicted0.detach(), dim=1)
    projected1 = F.normalize(predicted1.detach(), dim=1)
    nn0, index0 = queue.find_nn(projected0, data['ids'])
    nn1, index1 = queue.find_nn(projected1, data['ids'])
    loss = nnclr_loss(predicted0, predicted1, nn0, nn1, TEMPERATURE)
    loss.backward()
    accuracy = queue.nn_accuracy(index0, data['labels'])
    queue.enqueue(projected0, data['ids'], data['labels'])
    after_step = {name: buffer.clone() for name, buffer in queue.state_dict().items()}
    queue.enqueue(data['later'], data['ids'])

    return {
        'loss': loss.detach(),
        'accuracy': accuracy,
        'index0': index0,
        'index1': index1,
        'grad_predicted0': predicted0.grad,
        'grad_predicted1': predicted1.grad,
        'grad_weight': predictor.weight.grad,
        'grad_bias': predictor.bias.grad,
        'queue_after_step': after_step,
        'queue_final': queue.state_dict(),
    }


def rank_worker(process_rank: int) -> dict:
    """Run this rank's share of the step and the collective checks, so one spawn serves every test in this file."""
    result = run_step(slice(process_rank * LOCAL_BATCH, (process_rank + 1) * LOCAL_BATCH))
    # Average the parameter gradients over ranks, as DDP does.
    for name in ('grad_weight', 'grad_bias'):
        dist.all_reduce(result[name], op=dist.ReduceOp.SUM)
        result[name] /= WORLD_SIZE
    result['collectives'] = run_collectives(process_rank)
    return result


@pytest.fixture(scope='module')
def step_results(tmp_path_factory):
    single = run_step(slice(None))
    ranks = spawn_ranks(rank_worker, tmp_path_factory.mktemp('ranks'))
    return single, ranks


def test_two_ranks_loss_matches_one_process(step_results):
    single, ranks = step_results

    mean_loss = sum(result['loss'] for result in ranks) / WORLD_SIZE

    torch.testing.assert_close(mean_loss, single['loss'], rtol=1e-6, atol=1e-6)
    assert not torch.allclose(ranks[0]['loss'], ranks[1]['loss']), 'per-rank losses should differ on different rows'


def test_two_ranks_neighbours_match_one_process(step_results):
    single, ranks = step_results

    assert torch.equal(torch.cat([result['index0'] for result in ranks]), single['index0'])
    assert torch.equal(torch.cat([result['index1'] for result in ranks]), single['index1'])
    # Row i contains the earlier entry of query i (same id), so no query may return its own row.
    own_rows = torch.arange(GLOBAL_BATCH)
    assert not (single['index0'] == own_rows).any()
    assert not (single['index1'] == own_rows).any()


def test_two_ranks_gradients_match_one_process(step_results):
    single, ranks = step_results

    for name in ('grad_predicted0', 'grad_predicted1'):
        # Each rank's prediction gradient is that of the sum of all ranks' losses, and DDP's averaging divides it.
        gathered = torch.cat([result[name] for result in ranks]) / WORLD_SIZE
        torch.testing.assert_close(gathered, single[name], rtol=1e-5, atol=1e-7)
    for name in ('grad_weight', 'grad_bias'):
        torch.testing.assert_close(ranks[0][name], single[name], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(ranks[1][name], single[name], rtol=1e-5, atol=1e-7)


def test_two_ranks_queue_matches_one_process(step_results):
    single, ranks = step_results

    for stage in ('queue_after_step', 'queue_final'):
        for name, buffer in single[stage].items():
            for process_rank, result in enumerate(ranks):
                torch.testing.assert_close(result[stage][name], buffer, msg=f'{stage}/{name} on rank {process_rank}')
    assert single['queue_after_step']['queue_ptr'].tolist() == [0]
    assert single['queue_final']['queue_ptr'].tolist() == [GLOBAL_BATCH]


def test_two_ranks_accuracy_matches_expected(step_results):
    single, ranks = step_results
    labels = global_data()['labels']

    for process_rank, result in enumerate(ranks):
        rows = slice(process_rank * LOCAL_BATCH, (process_rank + 1) * LOCAL_BATCH)
        index = single['index0'][rows]
        # Only rows 0..7 carry labels before the step. The rest are initial entries with label -1.
        counted = index < GLOBAL_BATCH
        correct = counted & (labels[index.clamp(max=GLOBAL_BATCH - 1)] == labels[rows])
        expected = correct.sum().float() / counted.sum().float()
        torch.testing.assert_close(result['accuracy'], expected, equal_nan=True)


# ---------------------------------------------------------------------------------------------------------------------
# Collectives


def run_collectives(process_rank: int) -> dict:
    local = torch.full((2, 3), float(process_rank + 1), requires_grad=True)
    gathered = all_gather_with_grad(local)
    # Rank r weights the gathered rows by (r + 1), so the summed gradient of every row is 3 * arange.
    weights = torch.arange(12, dtype=torch.float32).reshape(4, 3) * (process_rank + 1)
    (gathered * weights).sum().backward()
    return {
        'rank': rank(),
        'world_size': world_size(),
        'gathered': gathered.detach(),
        'gathered_no_grad': all_gather_no_grad(local * 10),
        'grad': local.grad,
    }


def test_all_gather_on_two_ranks(step_results):
    _, ranks = step_results
    expected = torch.cat([torch.full((2, 3), 1.0), torch.full((2, 3), 2.0)])
    summed_weights = torch.arange(12, dtype=torch.float32).reshape(4, 3) * 3

    for process_rank, rank_result in enumerate(ranks):
        result = rank_result['collectives']
        assert result['rank'] == process_rank
        assert result['world_size'] == WORLD_SIZE
        torch.testing.assert_close(result['gathered'], expected)
        torch.testing.assert_close(result['gathered_no_grad'], expected * 10)
        assert not result['gathered_no_grad'].requires_grad
        torch.testing.assert_close(result['grad'], summed_weights[2 * process_rank : 2 * process_rank + 2])
