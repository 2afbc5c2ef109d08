"""Nearest-neighbour queue (support set) of NNCLR, as MAE-CT uses it.

The queue stores L2-normalised projections of earlier samples together with their dataset indices (ids) and labels.
For each new projection it returns a stored neighbour, which the loss uses as the anchor in place of the sample itself.
All state lives in persistent buffers, so it is saved with the model's ``state_dict``. Every rank enqueues the same
all-gathered global batch, so the queues stay identical on all ranks and any rank's copy restores a checkpoint.

Order within one training step: look up the neighbours of both views, compute the loss and ``nn_accuracy``, then
enqueue view 0. The current batch is therefore never its own neighbour candidate.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from composer_maect.distributed import all_gather_no_grad

__all__ = ['NNQueue']

# Marks a missing id or label, and the empty slots of a new queue.
MISSING = -1


class NNQueue(nn.Module):
    """FIFO queue of ``size`` unit vectors of ``dim`` channels with per-entry ids and labels.

    Buffers (all persistent):

    * ``queue`` ``[size, dim]`` float32: the stored vectors, initially ``F.normalize(randn)``.
    * ``queue_ids`` ``[size]`` int64: the dataset index of each entry, ``-1`` while empty or unknown.
    * ``queue_labels`` ``[size]`` int64: the class label of each entry, ``-1`` while empty or unknown. Labels only feed
      the ``nn_accuracy`` metric.
    * ``queue_ptr`` ``[1]`` int64: the row that the next enqueue writes first.
    * ``num_filled`` ``[1]`` int64: how many rows have been written since initialisation, at most ``size``.

    The initial random entries are valid neighbour candidates until they are overwritten, as in the official MAE-CT
    code. Similarities, lookups and writes run in float32 with autocast disabled, whatever the caller's precision.

    Args:
        size: Number of entries (65536 in MAE-CT). Must be a multiple of the global batch size.
        dim: Channels per entry (the projector's output dim, 256 in MAE-CT).
        seed: Seed of a private generator for the random initial entries. It does not touch the global RNG, and every
            rank builds the same initial queue as long as all ranks pass the same seed.

    Raises:
        ValueError: If ``size`` or ``dim`` is not positive.
    """

    def __init__(self, size: int, dim: int, *, seed: int = 0):
        super().__init__()
        if size < 1:
            raise ValueError(f'size must be a positive number of queue entries, got {size}.')
        if dim < 1:
            raise ValueError(f'dim must be a positive number of channels, got {dim}.')
        self.size = size
        self.dim = dim

        generator = torch.Generator().manual_seed(seed)
        self.register_buffer('queue', F.normalize(torch.randn(size, dim, generator=generator), dim=1))
        self.register_buffer('queue_ids', torch.full((size,), MISSING, dtype=torch.long))
        self.register_buffer('queue_labels', torch.full((size,), MISSING, dtype=torch.long))
        self.register_buffer('queue_ptr', torch.zeros(1, dtype=torch.long))
        self.register_buffer('num_filled', torch.zeros(1, dtype=torch.long))

    def extra_repr(self) -> str:
        return f'size={self.size}, dim={self.dim}'

    def check_batch_size(self, global_batch: int) -> None:
        """Raise ``ValueError`` unless ``global_batch`` (samples enqueued per step, over all ranks) divides ``size``.

        Call this at start-up to fail before any compute is spent. :meth:`enqueue` runs the same check on every call.
        """
        if global_batch < 1:
            raise ValueError(f'The global batch size must be positive, got {global_batch}.')
        if self.size % global_batch != 0:
            larger = -(-self.size // global_batch) * global_batch
            raise ValueError(
                f'The queue size {self.size} is not a multiple of the global batch size {global_batch}. Each step '
                f'writes the whole global batch at once, so choose a queue size that is a multiple of it (for '
                f'example {larger}) or change the batch size.'
            )

    def find_nn(
        self,
        z_normalized: torch.Tensor,
        ids: torch.Tensor | None = None,
        topk: int = 1,
        *,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Find a neighbour in the queue for each query by cosine similarity.

        Entries whose id equals the query's own id (the same image from an earlier step) are excluded. With
        ``topk == 1`` the most similar remaining entry is returned. With ``topk > 1`` one of the ``topk`` most
        similar entries is drawn uniformly at random for each query. The official MAE-CT code writes the first case
        as ``topk=0``.

        Args:
            z_normalized: L2-normalised queries ``[batch, dim]``.
            ids: Dataset indices of the queries ``[batch]``, or ``None`` to exclude nothing. A query with a negative
                id excludes nothing either, because ``-1`` also marks empty slots.
            topk: Number of most similar entries to draw from, between 1 and ``size``.
            generator: Generator for the random draw when ``topk > 1``. The default is torch's global CPU generator,
                whose per-rank state Composer saves in checkpoints, so a resumed run draws the same neighbours. The
                draw happens on the generator's device and is then moved to the queries' device.

        Returns:
            ``(nn, index)``: the neighbours ``[batch, dim]`` (float32 copies of queue rows, without gradient) and their
            rows in the queue ``[batch]`` (int64), which :meth:`nn_accuracy` takes.

        Raises:
            ValueError: If ``topk`` is outside ``[1, size]`` or the shapes, dtypes or devices do not match the queue.

        NOTE: if fewer than ``topk`` entries remain after excluding the query's own id, the lookup can return an
        excluded entry. That only happens when the queue contains the same image at least ``size - topk + 1`` times.
        """
        if topk < 1:
            raise ValueError(f'topk must be at least 1 (1 returns the nearest neighbour), got {topk}.')
        if topk > self.size:
            raise ValueError(
                f'topk {topk} is larger than the queue size {self.size}. Use a topk of at most {self.size}.'
            )
        self._check_rows(z_normalized, 'z_normalized')
        batch = z_normalized.shape[0]
        if ids is not None:
            self._check_per_row(ids, batch, 'ids')

        with torch.no_grad(), torch.autocast(device_type=z_normalized.device.type, enabled=False):
            queue = self.queue.float()
            similarity = z_normalized.detach().float() @ queue.T  # [batch, size]
            if ids is not None:
                ids = ids.unsqueeze(1)
                own = (self.queue_ids.unsqueeze(0) == ids) & (ids >= 0)
                similarity = similarity.masked_fill(own, float('-inf'))

            if topk == 1:
                index = similarity.argmax(dim=1)
            else:
                candidates = similarity.topk(topk, dim=1).indices  # [batch, topk]
                draw_device = generator.device if generator is not None else torch.device('cpu')
                choice = torch.randint(topk, (batch, 1), generator=generator, device=draw_device)
                # non_blocking: a blocking copy from host memory to a CUDA device waits for the whole stream.
                index = candidates.gather(1, choice.to(candidates.device, non_blocking=True)).squeeze(1)
            return queue[index], index

    def enqueue(
        self,
        z_normalized: torch.Tensor,
        ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> None:
        """All-gather the local batch over ranks and write the global batch at ``queue_ptr``, oldest entries first.

        Rank ``r``'s rows land after those of ranks ``0 .. r-1``. The pointer then advances by the global batch size,
        modulo ``size``. Because the global batch divides ``size``, a batch never wraps around mid-write. Every rank
        must call this with the same local batch size, since the all-gather is a collective.

        Args:
            z_normalized: L2-normalised vectors ``[batch, dim]`` (view 0's projections in MAE-CT). They are stored as
                given, without normalising again.
            ids: Dataset indices ``[batch]``, or ``None`` to store ``-1``.
            labels: Class labels ``[batch]``, or ``None`` to store ``-1``.

        Raises:
            ValueError: If the global batch size does not divide ``size``, or the shapes, dtypes or devices do not
                match the queue.
        """
        self._check_rows(z_normalized, 'z_normalized')
        batch = z_normalized.shape[0]
        if ids is None:
            ids = torch.full((batch,), MISSING, dtype=torch.long, device=z_normalized.device)
        if labels is None:
            labels = torch.full((batch,), MISSING, dtype=torch.long, device=z_normalized.device)
        self._check_per_row(ids, batch, 'ids')
        self._check_per_row(labels, batch, 'labels')

        with torch.no_grad(), torch.autocast(device_type=z_normalized.device.type, enabled=False):
            vectors = all_gather_no_grad(z_normalized.float())
            ids = all_gather_no_grad(ids.long())
            labels = all_gather_no_grad(labels.long())
            global_batch = vectors.shape[0]
            self.check_batch_size(global_batch)

            # Row positions are computed on the device, so the write needs no host synchronisation.
            rows = (self.queue_ptr + torch.arange(global_batch, device=self.queue_ptr.device)) % self.size
            self.queue.index_copy_(0, rows, vectors.to(self.queue.dtype))
            self.queue_ids.index_copy_(0, rows, ids)
            self.queue_labels.index_copy_(0, rows, labels)
            self.queue_ptr.add_(global_batch).remainder_(self.size)
            self.num_filled.add_(global_batch).clamp_(max=self.size)

    def nn_accuracy(self, index: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Return the fraction of queries whose neighbour has the query's label, as a float32 scalar tensor.

        Queries with a negative label, and queries whose neighbour has a negative label (an initial random entry or an
        unlabelled sample), are left out of both counts. The result is NaN when no query is left. The official MAE-CT
        code divides by the number of all queries instead, so its value is lower while unlabelled entries remain.

        Call this before :meth:`enqueue`, which may overwrite the rows that ``index`` points to.

        Args:
            index: Queue rows returned by :meth:`find_nn` ``[batch]``.
            labels: Labels of the queries ``[batch]``.
        """
        if index.shape != labels.shape or index.dim() != 1:
            raise ValueError(
                f'index and labels must both have shape [batch], got {tuple(index.shape)} and {tuple(labels.shape)}.'
            )
        neighbour_labels = self.queue_labels[index.to(self.queue_labels.device)]
        labels = labels.to(neighbour_labels.device)
        counted = (labels >= 0) & (neighbour_labels >= 0)
        correct = counted & (neighbour_labels == labels)
        return correct.sum().float() / counted.sum().float()

    def fill_fraction(self) -> float:
        """Return the fraction of entries written since initialisation, in ``[0, 1]``.

        Reading the counter synchronises with the device, so call this only when logging.
        """
        return self.num_filled.item() / self.size

    def _check_rows(self, z: torch.Tensor, name: str) -> None:
        if z.dim() != 2 or z.shape[1] != self.dim:
            raise ValueError(f'{name} must have shape [batch, {self.dim}], got {tuple(z.shape)}.')
        if z.shape[0] == 0:
            raise ValueError(f'{name} is an empty batch. Pass at least one row.')
        if z.device != self.queue.device:
            raise ValueError(
                f'{name} is on {z.device} but the queue is on {self.queue.device}. Move the queue with .to(device).'
            )

    def _check_per_row(self, values: torch.Tensor, batch: int, name: str) -> None:
        if values.shape != (batch,):
            raise ValueError(f'{name} must have shape [{batch}] (one per row), got {tuple(values.shape)}.')
        if values.is_floating_point() or values.is_complex() or values.dtype == torch.bool:
            raise ValueError(f'{name} must be an integer tensor, got {values.dtype}.')
        if values.device != self.queue.device:
            raise ValueError(
                f'{name} is on {values.device} but the queue is on {self.queue.device}. Move them to the same device.'
            )

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A state dict without the fill counter (converted from the official MAE-CT code, which has none) gets the
        # count of entries that carry an id. Entries written without ids are not counted in that case.
        ids_key = prefix + 'queue_ids'
        filled_key = prefix + 'num_filled'
        if filled_key not in state_dict and ids_key in state_dict:
            state_dict[filled_key] = (state_dict[ids_key] != MISSING).sum().reshape(1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
