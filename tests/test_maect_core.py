"""Single-process tests of the MAE-CT core: the NNCLR loss, the nearest-neighbour queue and the NNCLR head."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from composer_maect.distributed import all_gather_no_grad, all_gather_with_grad, rank, world_size
from composer_maect.losses import nnclr_loss
from composer_maect.models.nnclr_head import NNCLRHead
from composer_maect.models.queue import NNQueue

# ---------------------------------------------------------------------------------------------------------------------
# Loss


def reference_nnclr_loss(predicted0, predicted1, nn0, nn1, temperature):
    """Compute the symmetric NNCLR loss with Python floats, one row and one softmax at a time."""

    def normalize(rows):
        return [[value / math.sqrt(sum(v * v for v in row)) for value in row] for row in rows]

    def direction(predicted, anchors):
        predictions = normalize(predicted)
        total = 0.0
        for i, anchor in enumerate(anchors):
            logits = [
                sum(a * p for a, p in zip(anchor, prediction, strict=True)) / temperature for prediction in predictions
            ]
            largest = max(logits)
            exps = [math.exp(logit - largest) for logit in logits]
            total += -math.log(exps[i] / sum(exps))
        return total / len(anchors)

    rows = [t.tolist() for t in (predicted0, predicted1, nn0, nn1)]
    return (direction(rows[0], rows[3]) + direction(rows[1], rows[2])) / 2


def random_loss_inputs(n=6, dim=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    predicted0 = torch.randn(n, dim, generator=generator)
    predicted1 = torch.randn(n, dim, generator=generator)
    nn0 = F.normalize(torch.randn(n, dim, generator=generator), dim=1)
    nn1 = F.normalize(torch.randn(n, dim, generator=generator), dim=1)
    return predicted0, predicted1, nn0, nn1


@pytest.mark.parametrize('temperature', [0.15, 0.2, 1.0])
@pytest.mark.parametrize('seed', [0, 1, 2])
def test_loss_matches_reference(temperature, seed):
    inputs = random_loss_inputs(seed=seed)

    loss = nnclr_loss(*inputs, temperature)

    assert loss.dim() == 0
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(reference_nnclr_loss(*inputs, temperature), rel=1e-5)


def test_loss_is_not_symmetric_in_neighbours():
    # The neighbour of view 1 anchors the predictions of view 0, so swapping nn0 and nn1 changes the loss.
    predicted0, predicted1, nn0, nn1 = random_loss_inputs()

    loss = nnclr_loss(predicted0, predicted1, nn0, nn1, 0.2)
    swapped = nnclr_loss(predicted0, predicted1, nn1, nn0, 0.2)

    assert swapped.item() == pytest.approx(reference_nnclr_loss(predicted0, predicted1, nn1, nn0, 0.2), rel=1e-5)
    assert loss.item() != pytest.approx(swapped.item(), rel=1e-3)


def test_loss_gradient_only_reaches_predictions():
    predicted0, predicted1, nn0, nn1 = (t.clone().requires_grad_(True) for t in random_loss_inputs())

    nnclr_loss(predicted0, predicted1, nn0, nn1, 0.2).backward()

    assert nn0.grad is None
    assert nn1.grad is None
    assert predicted0.grad is not None
    assert predicted1.grad is not None
    assert predicted0.grad.abs().sum() > 0
    assert predicted1.grad.abs().sum() > 0


def test_loss_gradient_matches_float64_autograd():
    predicted0, predicted1, nn0, nn1 = random_loss_inputs(seed=3)
    p0 = predicted0.double().requires_grad_(True)
    p1 = predicted1.double().requires_grad_(True)
    targets = torch.arange(len(p0))
    expected = (
        F.cross_entropy(nn1.double() @ F.normalize(p0, dim=1).T / 0.2, targets)
        + F.cross_entropy(nn0.double() @ F.normalize(p1, dim=1).T / 0.2, targets)
    ) / 2
    expected.backward()

    q0 = predicted0.clone().requires_grad_(True)
    q1 = predicted1.clone().requires_grad_(True)
    nnclr_loss(q0, q1, nn0, nn1, 0.2).backward()

    torch.testing.assert_close(q0.grad, p0.grad.float(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(q1.grad, p1.grad.float(), rtol=1e-4, atol=1e-6)


def test_loss_runs_in_float32_under_autocast():
    inputs = random_loss_inputs()
    expected = nnclr_loss(*inputs, 0.2)

    with torch.autocast('cpu', dtype=torch.bfloat16):
        under_autocast = nnclr_loss(*inputs, 0.2)
        from_bfloat16 = nnclr_loss(*(t.bfloat16() for t in inputs), 0.2)

    assert under_autocast.dtype == torch.float32
    assert under_autocast.item() == expected.item()
    assert from_bfloat16.dtype == torch.float32


@pytest.mark.parametrize('temperature', [0.0, -0.2, float('nan')])
def test_loss_rejects_non_positive_temperature(temperature):
    with pytest.raises(ValueError, match='temperature must be positive'):
        nnclr_loss(*random_loss_inputs(), temperature)


def test_loss_rejects_mismatched_shapes():
    predicted0, predicted1, nn0, nn1 = random_loss_inputs()

    with pytest.raises(ValueError, match=r"'nn1': \(5, 8\)"):
        nnclr_loss(predicted0, predicted1, nn0, nn1[:5], 0.2)
    with pytest.raises(ValueError, match='share one non-empty shape'):
        nnclr_loss(predicted0[0], predicted1[0], nn0[0], nn1[0], 0.2)
    with pytest.raises(ValueError, match='share one non-empty shape'):
        nnclr_loss(predicted0[:0], predicted1[:0], nn0[:0], nn1[:0], 0.2)


# ---------------------------------------------------------------------------------------------------------------------
# Distributed helpers without a process group


def test_distributed_helpers_without_process_group():
    tensor = torch.randn(3, 2, requires_grad=True)

    assert rank() == 0
    assert world_size() == 1
    assert all_gather_with_grad(tensor) is tensor
    gathered = all_gather_no_grad(tensor)
    assert not gathered.requires_grad
    torch.testing.assert_close(gathered, tensor.detach())


# ---------------------------------------------------------------------------------------------------------------------
# Queue


def queue_with_rows(rows, ids=None, labels=None):
    """Build a queue whose entries are exactly ``rows`` (normalised), with the given ids and labels."""
    rows = F.normalize(torch.as_tensor(rows, dtype=torch.float32), dim=1)
    queue = NNQueue(rows.shape[0], rows.shape[1])
    queue.queue.copy_(rows)
    if ids is not None:
        queue.queue_ids.copy_(torch.as_tensor(ids))
    if labels is not None:
        queue.queue_labels.copy_(torch.as_tensor(labels))
    return queue


def test_queue_initial_state():
    queue = NNQueue(16, 4)

    assert queue.queue.shape == (16, 4)
    assert queue.queue.dtype == torch.float32
    torch.testing.assert_close(queue.queue.norm(dim=1), torch.ones(16))
    assert (queue.queue_ids == -1).all()
    assert (queue.queue_labels == -1).all()
    assert queue.queue_ptr.tolist() == [0]
    assert queue.queue_ptr.dtype == torch.long
    assert queue.fill_fraction() == 0.0


def test_queue_init_uses_private_generator():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    first = NNQueue(8, 4, seed=5)
    after = torch.rand(3)
    second = NNQueue(8, 4, seed=5)
    other_seed = NNQueue(8, 4, seed=6)

    torch.testing.assert_close(after, expected)
    torch.testing.assert_close(first.queue, second.queue)
    assert not torch.equal(first.queue, other_seed.queue)


@pytest.mark.parametrize(('size', 'dim'), [(0, 4), (8, 0), (-1, 4)])
def test_queue_rejects_invalid_size(size, dim):
    with pytest.raises(ValueError, match='must be a positive number'):
        NNQueue(size, dim)


def test_find_nn_returns_most_similar():
    queue = queue_with_rows([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0]])
    queries = F.normalize(torch.tensor([[0.9, 0.1, 0.0], [0.0, 0.2, 1.0], [1.0, 0.9, 0.0]]), dim=1)

    nn_rows, index = queue.find_nn(queries)

    assert index.tolist() == [0, 2, 3]
    assert index.dtype == torch.long
    torch.testing.assert_close(nn_rows, queue.queue[index])


def test_find_nn_excludes_own_id():
    # The entry with the query's own id (row 0) is identical to the query, so it would win without the exclusion.
    queue = queue_with_rows([[1, 0, 0], [1, 0.2, 0], [1, 0.5, 0], [0, 1, 0]], ids=[7, 3, 7, 4])
    query = F.normalize(torch.tensor([[1.0, 0.0, 0.0]]), dim=1)

    _, without_ids = queue.find_nn(query)
    _, index = queue.find_nn(query, torch.tensor([7]))
    _, other_id = queue.find_nn(query, torch.tensor([4]))

    assert without_ids.tolist() == [0]
    assert index.tolist() == [1]
    assert other_id.tolist() == [0]


def test_find_nn_topk_never_draws_own_id():
    queue = queue_with_rows([[1, 0, 0], [1, 0.2, 0], [1, 0.5, 0], [1, 0.9, 0], [0, 0, 1]], ids=[7, 1, 2, 3, 4])
    queries = F.normalize(torch.tensor([[1.0, 0.0, 0.0]]), dim=1).expand(3000, 3)

    _, index = queue.find_nn(queries, torch.full((3000,), 7), topk=3)

    assert set(index.tolist()) == {1, 2, 3}


def test_find_nn_negative_id_excludes_nothing():
    # Empty slots carry id -1, so a query without an id must not exclude them.
    queue = queue_with_rows([[1, 0, 0], [0, 1, 0]])
    query = F.normalize(torch.tensor([[1.0, 0.1, 0.0]]), dim=1)

    _, index = queue.find_nn(query, torch.tensor([-1]))

    assert index.tolist() == [0]


def test_find_nn_topk_draws_uniformly():
    # Similarities to the query fall with the row index, so the top 4 are rows 0..3.
    rows = [[1.0, 0.1 * i, 0.0] for i in range(10)]
    queue = queue_with_rows(rows)
    queries = F.normalize(torch.tensor([[1.0, 0.0, 0.0]]), dim=1).expand(4000, 3)

    _, index = queue.find_nn(queries, topk=4, generator=torch.Generator().manual_seed(0))

    counts = torch.bincount(index, minlength=10)
    assert set(index.tolist()) == {0, 1, 2, 3}
    assert counts[4:].sum() == 0
    for row in range(4):
        assert 800 < counts[row] < 1200, f'row {row} drawn {counts[row]} times out of 4000'


def test_find_nn_topk_draws_are_reproducible():
    queue = queue_with_rows([[1.0, 0.1 * i, 0.0] for i in range(10)])
    queries = F.normalize(torch.randn(50, 3), dim=1)

    first = queue.find_nn(queries, topk=5, generator=torch.Generator().manual_seed(1))[1]
    second = queue.find_nn(queries, topk=5, generator=torch.Generator().manual_seed(1))[1]
    torch.manual_seed(2)
    global_first = queue.find_nn(queries, topk=5)[1]
    torch.manual_seed(2)
    global_second = queue.find_nn(queries, topk=5)[1]

    assert torch.equal(first, second)
    assert torch.equal(global_first, global_second)


def test_find_nn_topk_equal_to_size():
    queue = queue_with_rows([[1, 0], [0, 1], [-1, 0]])
    queries = F.normalize(torch.tensor([[1.0, 0.0]]), dim=1).expand(600, 2)

    _, index = queue.find_nn(queries, topk=3)

    assert set(index.tolist()) == {0, 1, 2}


def test_find_nn_rejects_invalid_topk():
    queue = NNQueue(8, 4)
    query = F.normalize(torch.randn(2, 4), dim=1)

    with pytest.raises(ValueError, match='topk 9 is larger than the queue size 8'):
        queue.find_nn(query, topk=9)
    with pytest.raises(ValueError, match='topk must be at least 1'):
        queue.find_nn(query, topk=0)


def test_find_nn_rejects_bad_input():
    queue = NNQueue(8, 4)

    with pytest.raises(ValueError, match=r'shape \[batch, 4\], got \(2, 3\)'):
        queue.find_nn(torch.randn(2, 3))
    with pytest.raises(ValueError, match='empty batch'):
        queue.find_nn(torch.randn(0, 4))
    with pytest.raises(ValueError, match=r'ids must have shape \[2\]'):
        queue.find_nn(torch.randn(2, 4), torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match='integer tensor'):
        queue.find_nn(torch.randn(2, 4), torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match=r'on meta but the queue is on cpu'):
        queue.find_nn(torch.randn(2, 4, device='meta'))


def test_find_nn_float32_under_autocast():
    queue = NNQueue(32, 8)
    queries = F.normalize(torch.randn(5, 8), dim=1)
    expected_rows, expected_index = queue.find_nn(queries)

    with torch.autocast('cpu', dtype=torch.bfloat16):
        nn_rows, index = queue.find_nn(queries)
        bfloat16_rows, _ = queue.find_nn(queries.bfloat16())

    assert nn_rows.dtype == torch.float32
    assert bfloat16_rows.dtype == torch.float32
    assert torch.equal(index, expected_index)
    assert torch.equal(nn_rows, expected_rows)


def test_find_nn_returns_copies_without_grad():
    queue = NNQueue(8, 4)
    queries = F.normalize(torch.randn(3, 4), dim=1).requires_grad_(True)

    nn_rows, _ = queue.find_nn(queries)
    saved = nn_rows.clone()
    queue.enqueue(torch.zeros(8, 4), torch.arange(8))

    assert not nn_rows.requires_grad
    torch.testing.assert_close(nn_rows, saved)


def test_enqueue_order_and_wrap_around():
    queue = NNQueue(6, 3)
    batches = [F.normalize(torch.randn(2, 3), dim=1) for _ in range(4)]
    expected_ptr = [2, 4, 0, 2]
    expected_fill = [1 / 3, 2 / 3, 1.0, 1.0]

    for step, batch in enumerate(batches):
        queue.enqueue(batch, torch.tensor([10 * step, 10 * step + 1]), torch.tensor([step, step]))
        assert queue.queue_ptr.tolist() == [expected_ptr[step]]
        assert queue.fill_fraction() == pytest.approx(expected_fill[step])

    # The fourth batch overwrote the oldest rows (0 and 1), and rows 2..5 still contain batches 1 and 2.
    torch.testing.assert_close(queue.queue, torch.cat([batches[3], batches[1], batches[2]]))
    assert queue.queue_ids.tolist() == [30, 31, 10, 11, 20, 21]
    assert queue.queue_labels.tolist() == [3, 3, 1, 1, 2, 2]


def test_enqueue_without_ids_and_labels_stores_missing():
    queue = NNQueue(4, 2)

    queue.enqueue(F.normalize(torch.randn(2, 2), dim=1))

    assert queue.queue_ids.tolist() == [-1, -1, -1, -1]
    assert queue.queue_labels.tolist() == [-1, -1, -1, -1]
    assert queue.fill_fraction() == 0.5


def test_enqueue_stores_float32_under_autocast():
    queue = NNQueue(4, 2)
    batch = F.normalize(torch.randn(4, 2), dim=1)

    with torch.autocast('cpu', dtype=torch.bfloat16):
        queue.enqueue(batch.bfloat16(), torch.arange(4))

    assert queue.queue.dtype == torch.float32
    torch.testing.assert_close(queue.queue, batch.bfloat16().float())


def test_enqueue_rejects_batch_not_dividing_size():
    queue = NNQueue(6, 3)
    before = {name: buffer.clone() for name, buffer in queue.named_buffers()}

    with pytest.raises(ValueError, match='queue size 6 is not a multiple of the global batch size 4'):
        queue.enqueue(F.normalize(torch.randn(4, 3), dim=1), torch.arange(4))

    for name, buffer in queue.named_buffers():
        assert torch.equal(buffer, before[name]), f'{name} changed by a rejected enqueue'


@pytest.mark.parametrize(('global_batch', 'message'), [(4, 'for example 8'), (12, 'for example 12'), (0, 'positive')])
def test_check_batch_size_rejects(global_batch, message):
    with pytest.raises(ValueError, match=message):
        NNQueue(6, 3).check_batch_size(global_batch)


@pytest.mark.parametrize('global_batch', [1, 2, 3, 6])
def test_check_batch_size_accepts_divisors(global_batch):
    NNQueue(6, 3).check_batch_size(global_batch)


def test_enqueue_rejects_bad_input():
    queue = NNQueue(4, 2)
    batch = F.normalize(torch.randn(2, 2), dim=1)

    with pytest.raises(ValueError, match=r'labels must have shape \[2\]'):
        queue.enqueue(batch, torch.arange(2), torch.arange(3))
    with pytest.raises(ValueError, match='ids must be an integer tensor'):
        queue.enqueue(batch, torch.tensor([True, False]))
    with pytest.raises(ValueError, match=r'shape \[batch, 2\]'):
        queue.enqueue(batch.T.reshape(1, 4))


def test_nn_accuracy():
    queue = NNQueue(6, 2)
    queue.queue_labels.copy_(torch.tensor([0, 1, 2, -1, 1, 0]))

    index = torch.tensor([0, 1, 2, 3, 4, 5])
    labels = torch.tensor([0, 1, 1, 2, -1, 1])

    # Queries 0, 1, 2 and 5 are counted because query 3's neighbour and query 4 have no label. Of those, 0 and 1 match.
    accuracy = queue.nn_accuracy(index, labels)
    assert accuracy.dtype == torch.float32
    assert accuracy.item() == pytest.approx(0.5)
    assert queue.nn_accuracy(torch.tensor([3, 3]), torch.tensor([1, 2])).isnan()
    with pytest.raises(ValueError, match='index and labels'):
        queue.nn_accuracy(index, labels[:3])


def test_nn_accuracy_after_lookup():
    queue = queue_with_rows([[1, 0], [0, 1], [-1, 0], [0, -1]], ids=[0, 1, 2, 3], labels=[5, 6, 5, 6])
    queries = F.normalize(torch.tensor([[1.0, 0.1], [0.1, 1.0], [0.0, -1.0]]), dim=1)

    _, index = queue.find_nn(queries, torch.tensor([10, 11, 12]))

    assert index.tolist() == [0, 1, 3]
    assert queue.nn_accuracy(index, torch.tensor([5, 5, 6])).item() == pytest.approx(2 / 3)


def test_queue_buffers_in_state_dict():
    queue = NNQueue(4, 2)

    assert set(queue.state_dict()) == {'queue', 'queue_ids', 'queue_labels', 'queue_ptr', 'num_filled'}


def test_queue_state_dict_round_trip():
    queue = NNQueue(4, 2, seed=1)
    queue.enqueue(F.normalize(torch.randn(2, 2), dim=1), torch.tensor([3, 4]), torch.tensor([1, 0]))
    restored = NNQueue(4, 2, seed=2)

    restored.load_state_dict(queue.state_dict())

    for name, buffer in queue.state_dict().items():
        assert torch.equal(restored.state_dict()[name], buffer), name
    assert restored.fill_fraction() == 0.5


def test_queue_state_dict_without_fill_counter():
    queue = NNQueue(4, 2)
    queue.enqueue(F.normalize(torch.randn(2, 2), dim=1), torch.tensor([3, 4]))
    state = queue.state_dict()
    del state['num_filled']
    restored = NNQueue(4, 2)

    restored.load_state_dict(state)

    assert restored.fill_fraction() == 0.5


def test_queue_state_dict_rejects_other_size():
    with pytest.raises(RuntimeError, match='size mismatch'):
        NNQueue(8, 2).load_state_dict(NNQueue(4, 2).state_dict())


# ---------------------------------------------------------------------------------------------------------------------
# Head


def test_head_architecture():
    head = NNCLRHead(32, proj_hidden_dim=16, pred_hidden_dim=24, out_dim=8)

    projector_types = [type(layer) for layer in head.projector]
    predictor_types = [type(layer) for layer in head.predictor]
    assert projector_types == [nn.Linear, nn.BatchNorm1d, nn.ReLU] * 2 + [nn.Linear, nn.BatchNorm1d]
    assert predictor_types == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    linear_shapes = [
        tuple(layer.weight.shape) for layer in [*head.projector, *head.predictor] if isinstance(layer, nn.Linear)
    ]
    assert linear_shapes == [(16, 32), (16, 16), (8, 16), (24, 8), (8, 24)]
    assert all(layer.bias is None for layer in [*head.projector, *head.predictor] if isinstance(layer, nn.Linear))
    assert head.projector[7].affine
    assert head.target_projector is None
    assert not head.has_target


def test_head_default_sizes():
    head = NNCLRHead(64)

    assert head.projector[0].weight.shape == (2048, 64)
    assert head.projector[6].weight.shape == (256, 2048)
    assert head.predictor[0].weight.shape == (4096, 256)
    assert head.predictor[3].weight.shape == (256, 4096)


def test_head_forward_without_target():
    head = NNCLRHead(32, 16, 24, 8)
    pooled = torch.randn(5, 32)

    projected, predicted = head(pooled)

    assert projected.shape == (5, 8)
    assert predicted.shape == (5, 8)
    torch.testing.assert_close(predicted, head.predictor(projected))


def test_head_forward_with_target_uses_target():
    head = NNCLRHead(32, 16, 24, 8, target_momentum=0.99)
    with torch.no_grad():
        head.target_projector[0].weight.mul_(2)
    pooled = torch.randn(5, 32, requires_grad=True)

    projected, predicted = head(pooled)

    # Training-mode BatchNorm uses batch statistics, so the same input gives the same output again.
    with torch.no_grad():
        expected_projected = head.target_projector(pooled)
        online_projected = head.projector(pooled)
        expected_predicted = head.predictor(online_projected)
    assert not projected.requires_grad
    assert predicted.requires_grad
    torch.testing.assert_close(projected, expected_projected)
    torch.testing.assert_close(predicted, expected_predicted)
    assert not torch.allclose(projected, online_projected)


def test_head_gradient_skips_target():
    head = NNCLRHead(32, 16, 24, 8, target_momentum=0.99)
    pooled = torch.randn(5, 32, requires_grad=True)

    _, predicted = head(pooled)
    predicted.square().sum().backward()

    assert all(param.grad is None for param in head.target_projector.parameters())
    assert all(param.grad is not None for param in head.projector.parameters())
    assert pooled.grad is not None


def test_head_target_not_aliased():
    head = NNCLRHead(32, 16, 24, 8, target_momentum=0.99)
    online = [*head.projector.parameters(), *head.projector.buffers()]
    target = [*head.target_projector.parameters(), *head.target_projector.buffers()]

    for online_tensor, target_tensor in zip(online, target, strict=True):
        assert online_tensor.data_ptr() != target_tensor.data_ptr()
        torch.testing.assert_close(online_tensor, target_tensor)
    assert all(not param.requires_grad for param in head.target_projector.parameters())
    assert all(param.requires_grad for param in head.projector.parameters())

    with torch.no_grad():
        head.projector[0].weight.add_(1.0)
    assert not torch.allclose(head.projector[0].weight, head.target_projector[0].weight)


def test_update_target_ema_and_buffer_copy():
    head = NNCLRHead(4, 3, 5, 2, target_momentum=0.9)
    with torch.no_grad():
        for index, (target_param, param) in enumerate(
            zip(head.target_projector.parameters(), head.projector.parameters(), strict=True)
        ):
            target_param.fill_(float(index))
            param.fill_(float(index) + 10.0)
    head(torch.randn(6, 4))  # training-mode forward: updates the running statistics of both projectors differently
    online_buffers = [buffer.clone() for buffer in head.projector.buffers()]
    online_params = [param.clone() for param in head.projector.parameters()]
    before = [param.clone() for param in head.target_projector.parameters()]

    head.update_target()

    for index, target_param in enumerate(head.target_projector.parameters()):
        torch.testing.assert_close(target_param, 0.9 * before[index] + 0.1 * online_params[index])
        torch.testing.assert_close(target_param, torch.full_like(target_param, index + 1.0))
    for target_buffer, online_buffer in zip(head.target_projector.buffers(), online_buffers, strict=True):
        assert torch.equal(target_buffer, online_buffer)
    assert head.target_projector[1].num_batches_tracked.item() == 1
    for param, saved in zip(head.projector.parameters(), online_params, strict=True):
        assert torch.equal(param, saved), 'update_target changed the online projector'


@pytest.mark.parametrize(('momentum', 'expected'), [(0.0, 'online'), (1.0, 'target')])
def test_update_target_momentum_bounds(momentum, expected):
    head = NNCLRHead(4, 3, 5, 2, target_momentum=momentum)
    with torch.no_grad():
        head.projector[0].weight.fill_(2.0)
        head.target_projector[0].weight.fill_(-1.0)

    head.update_target()

    assert head.target_projector[0].weight.unique().item() == (2.0 if expected == 'online' else -1.0)


def test_init_target_from_online():
    head = NNCLRHead(4, 3, 5, 2, target_momentum=0.99)
    with torch.no_grad():
        head.target_projector[0].weight.fill_(5.0)
        head.projector[1].running_mean.fill_(3.0)

    head.init_target_from_online()

    for name, tensor in head.projector.state_dict().items():
        assert torch.equal(head.target_projector.state_dict()[name], tensor), name
    assert head.target_projector[0].weight.data_ptr() != head.projector[0].weight.data_ptr()


def test_target_methods_need_target():
    head = NNCLRHead(4, 3, 5, 2)

    with pytest.raises(RuntimeError, match='no target projector'):
        head.update_target()
    with pytest.raises(RuntimeError, match='no target projector'):
        head.init_target_from_online()


def test_head_rejects_bad_input():
    with pytest.raises(ValueError, match='target_momentum must be in'):
        NNCLRHead(4, target_momentum=1.5)
    with pytest.raises(ValueError, match='target_momentum must be in'):
        NNCLRHead(4, target_momentum=-0.1)
    with pytest.raises(ValueError, match='out_dim must be a positive'):
        NNCLRHead(4, out_dim=0)
    with pytest.raises(ValueError, match=r'pooled must have shape \[batch, 4\]'):
        NNCLRHead(4, 3, 5, 2)(torch.randn(2, 5))


def test_state_dict_without_target_fills_target():
    stage2 = NNCLRHead(4, 3, 5, 2)
    stage2(torch.randn(6, 4))  # give the BatchNorms non-default running statistics
    stage3 = NNCLRHead(4, 3, 5, 2, target_momentum=0.99)

    result = stage3.load_state_dict(stage2.state_dict())

    assert result.missing_keys == []
    assert result.unexpected_keys == []
    for name, tensor in stage2.projector.state_dict().items():
        assert torch.equal(stage3.target_projector.state_dict()[name], tensor), name
        assert torch.equal(stage3.projector.state_dict()[name], tensor), name
    assert stage3.target_projector[0].weight.data_ptr() != stage3.projector[0].weight.data_ptr()


def test_state_dict_with_target_keeps_target():
    saved = NNCLRHead(4, 3, 5, 2, target_momentum=0.5)
    with torch.no_grad():
        saved.projector[0].weight.add_(1.0)
    saved.update_target()
    assert not torch.equal(saved.projector[0].weight, saved.target_projector[0].weight)
    resumed = NNCLRHead(4, 3, 5, 2, target_momentum=0.5)

    resumed.load_state_dict(saved.state_dict())

    for name, tensor in saved.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], tensor), name


def test_state_dict_round_trip_without_target():
    saved = NNCLRHead(4, 3, 5, 2)
    restored = NNCLRHead(4, 3, 5, 2)

    restored.load_state_dict(saved.state_dict())

    assert not any(key.startswith('target_projector.') for key in saved.state_dict())
    for name, tensor in saved.state_dict().items():
        assert torch.equal(restored.state_dict()[name], tensor), name


def test_target_keys_rejected_without_target():
    saved = NNCLRHead(4, 3, 5, 2, target_momentum=0.99)

    with pytest.raises(RuntimeError, match=r'Unexpected key.*target_projector'):
        NNCLRHead(4, 3, 5, 2).load_state_dict(saved.state_dict())


def test_nested_head_fills_target_with_assign():
    class Model(nn.Module):
        def __init__(self, target_momentum):
            super().__init__()
            self.encoder = nn.Linear(4, 4)
            self.head = NNCLRHead(4, 3, 5, 2, target_momentum=target_momentum)

    stage2 = Model(None)
    stage3 = Model(0.99)

    stage3.load_state_dict(stage2.state_dict(), assign=True)

    for name, tensor in stage2.head.projector.state_dict().items():
        assert torch.equal(stage3.head.target_projector.state_dict()[name], tensor), name
    assert stage3.head.target_projector[0].weight.data_ptr() != stage3.head.projector[0].weight.data_ptr()


def test_convert_sync_batchnorm():
    head = NNCLRHead(4, 3, 5, 2, target_momentum=0.99)
    params = list(head.parameters())

    converted = head.convert_sync_batchnorm()

    assert converted is head
    assert not any(isinstance(module, nn.BatchNorm1d) for module in head.modules())
    assert sum(isinstance(module, nn.SyncBatchNorm) for module in head.modules()) == 7
    assert all(a is b for a, b in zip(params, head.parameters(), strict=True))
    projected, predicted = head(torch.randn(6, 4))  # without a process group SyncBatchNorm acts as BatchNorm
    assert projected.shape == predicted.shape == (6, 2)
    head.update_target()
