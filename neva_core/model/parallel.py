"""Megatron-style tensor parallelism, kept out of the model's arithmetic.

The model calls these layers as if they were nn.Linear / nn.Embedding; the communication lives in
three autograd functions (Megatron's "mappings"), each the other's transpose so gradients are exact:

    copy_to_tp_region      forward: identity     backward: all-reduce (sum)
    reduce_from_tp_region  forward: all-reduce   backward: identity
    gather_from_tp_region  forward: all-gather   backward: keep this rank's slice
                           (last dim)

`tp_group=None` means TP=1 in one process: every mapping is the identity and no process group
needs to exist. A group of size 1 behaves the same.

Sharded parameters carry `tensor_model_parallel = True`, `partition_dim` and `partition_stride = 1`,
the attributes DeepSpeed reads to compute gradient norms correctly under TP. Replacing a parameter
(`load_state_dict(assign=True)`) drops them: `mark_tensor_parallel_parameters` puts them back.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from neva_core.errors import NevaError

TPGroup = dist.ProcessGroup | None


def tp_world_size(group: TPGroup) -> int:
    """Number of tensor-parallel ranks (1 without a group)."""
    return 1 if group is None else dist.get_world_size(group)


def tp_rank(group: TPGroup) -> int:
    """This process's rank inside the tensor-parallel group (0 without a group)."""
    return 0 if group is None else dist.get_rank(group)


def divide_evenly(total: int, parts: int, what: str) -> int:
    if total % parts:
        raise NevaError(f"{what}={total} is not divisible by the tensor-parallel size {parts}")
    return total // parts


def mark_tensor_parallel(param: nn.Parameter, partition_dim: int) -> None:
    """Tag a sharded parameter the way Megatron does, so DeepSpeed counts its gradient norm on every rank."""
    param.tensor_model_parallel = True
    param.partition_dim = partition_dim
    param.partition_stride = 1


def mark_tensor_parallel_parameters(module: nn.Module) -> None:
    """Tag the sharded parameters of every tensor-parallel layer inside `module` (again)."""
    for layer in module.modules():
        if isinstance(layer, (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding)):
            layer.mark_parameters()


def _all_reduce(tensor: torch.Tensor, group: TPGroup) -> torch.Tensor:
    if tp_world_size(group) == 1:
        return tensor
    # Reduce a copy: the caller's tensor may still be needed (autograd saves some inputs).
    reduced = tensor.contiguous().clone()
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM, group=group)
    return reduced


def _gather_last_dim(tensor: torch.Tensor, group: TPGroup) -> torch.Tensor:
    world = tp_world_size(group)
    if world == 1:
        return tensor
    tensor = tensor.contiguous()
    parts = [torch.empty_like(tensor) for _ in range(world)]
    dist.all_gather(parts, tensor, group=group)
    return torch.cat(parts, dim=-1)


def _slice_last_dim(tensor: torch.Tensor, group: TPGroup) -> torch.Tensor:
    world = tp_world_size(group)
    if world == 1:
        return tensor
    return tensor.chunk(world, dim=-1)[tp_rank(group)].contiguous()


class _CopyToTPRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group: TPGroup) -> torch.Tensor:
        ctx.group = group
        return tensor

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _all_reduce(grad, ctx.group), None


class _ReduceFromTPRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group: TPGroup) -> torch.Tensor:
        return _all_reduce(tensor, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


class _GatherFromTPRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group: TPGroup) -> torch.Tensor:
        ctx.group = group
        return _gather_last_dim(tensor, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _slice_last_dim(grad, ctx.group), None


def copy_to_tp_region(tensor: torch.Tensor, group: TPGroup) -> torch.Tensor:
    """Enter a column-parallel region: identity forward, all-reduce of the input gradient backward."""
    return _CopyToTPRegion.apply(tensor, group)


def reduce_from_tp_region(tensor: torch.Tensor, group: TPGroup) -> torch.Tensor:
    """Leave a row-parallel region: sum the partial results of every rank."""
    return _ReduceFromTPRegion.apply(tensor, group)


def gather_from_tp_region(tensor: torch.Tensor, group: TPGroup) -> torch.Tensor:
    """Concatenate every rank's last-dim slice (e.g. logits) into the full tensor on every rank."""
    return _GatherFromTPRegion.apply(tensor, group)


class ColumnParallelLinear(nn.Module):
    """y = x Wᵀ (+ b) with W split by output rows: each rank returns its slice of the output features."""

    def __init__(self, in_features: int, out_features: int, tp_group: TPGroup = None, bias: bool = False) -> None:
        super().__init__()
        self.tp_group = tp_group
        local_out = divide_evenly(out_features, tp_world_size(tp_group), "output features of a column-parallel layer")
        self.weight = nn.Parameter(torch.empty(local_out, in_features))
        if bias:
            self.bias = nn.Parameter(torch.empty(local_out))
        else:
            self.register_parameter("bias", None)
        self.mark_parameters()

    def mark_parameters(self) -> None:
        mark_tensor_parallel(self.weight, partition_dim=0)
        if self.bias is not None:
            mark_tensor_parallel(self.bias, partition_dim=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(copy_to_tp_region(x, self.tp_group), self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """y = x Wᵀ with W split by input columns: takes this rank's input slice, returns the full (summed) output."""

    def __init__(self, in_features: int, out_features: int, tp_group: TPGroup = None) -> None:
        super().__init__()
        self.tp_group = tp_group
        local_in = divide_evenly(in_features, tp_world_size(tp_group), "input features of a row-parallel layer")
        self.weight = nn.Parameter(torch.empty(out_features, local_in))
        self.mark_parameters()

    def mark_parameters(self) -> None:
        mark_tensor_parallel(self.weight, partition_dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return reduce_from_tp_region(F.linear(x, self.weight), self.tp_group)


class VocabParallelEmbedding(nn.Module):
    """Embedding whose rows (vocabulary ids) are split across ranks; every rank returns the full embeddings."""

    def __init__(self, num_embeddings: int, embedding_dim: int, tp_group: TPGroup = None) -> None:
        super().__init__()
        self.tp_group = tp_group
        local_rows = divide_evenly(num_embeddings, tp_world_size(tp_group), "padded vocabulary size")
        self.vocab_start = tp_rank(tp_group) * local_rows
        self.vocab_end = self.vocab_start + local_rows
        self.weight = nn.Parameter(torch.empty(local_rows, embedding_dim))
        self.mark_parameters()

    def mark_parameters(self) -> None:
        mark_tensor_parallel(self.weight, partition_dim=0)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if tp_world_size(self.tp_group) == 1:
            return F.embedding(input_ids, self.weight)
        # Ids owned by another rank look up row 0 here and are zeroed; the all-reduce fills them in.
        foreign = (input_ids < self.vocab_start) | (input_ids >= self.vocab_end)
        local_ids = (input_ids - self.vocab_start).masked_fill(foreign, 0)
        embeddings = F.embedding(local_ids, self.weight).masked_fill(foreign.unsqueeze(-1), 0.0)
        return reduce_from_tp_region(embeddings, self.tp_group)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Per-token cross entropy over vocab-sharded logits, in fp32, exchanging only [B, T] statistics.

    Saves the local softmax for backward (grad = softmax − one_hot(target)), as Megatron does.
    """

    @staticmethod
    def forward(ctx, local_logits: torch.Tensor, labels: torch.Tensor, group: TPGroup,
                ignore_index: int, vocab_size: int | None) -> torch.Tensor:
        logits = local_logits.to(torch.float32, copy=True)  # modified in place below; keep the caller's intact
        local_vocab = logits.shape[-1]
        vocab_start = tp_rank(group) * local_vocab
        if vocab_size is not None and vocab_start + local_vocab > vocab_size:
            # Padding columns are not tokens: -inf gives them exactly zero probability and zero gradient.
            padding = torch.arange(vocab_start, vocab_start + local_vocab, device=logits.device) >= vocab_size
            logits.masked_fill_(padding, float("-inf"))

        global_max = logits.max(dim=-1).values
        if tp_world_size(group) > 1:
            dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=group)
        logits -= global_max.unsqueeze(-1)

        ignored = labels == ignore_index
        foreign = ignored | (labels < vocab_start) | (labels >= vocab_start + local_vocab)
        local_labels = (labels - vocab_start).masked_fill(foreign, 0)
        target_logit = logits.gather(-1, local_labels.unsqueeze(-1)).squeeze(-1).masked_fill(foreign, 0.0)

        exp_logits = logits.exp_()
        sum_exp = exp_logits.sum(dim=-1)
        if tp_world_size(group) > 1:
            stats = torch.stack([target_logit, sum_exp])  # one all-reduce for both statistics
            dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=group)
            target_logit, sum_exp = stats[0], stats[1]

        loss = (torch.log(sum_exp) - target_logit).masked_fill(ignored, 0.0)
        softmax = exp_logits.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, local_labels, foreign, ignored)
        ctx.input_dtype = local_logits.dtype
        ctx.softmax_consumed = False
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        if ctx.softmax_consumed:
            raise RuntimeError("vocab_parallel_cross_entropy cannot be backpropagated twice (retain_graph)")
        ctx.softmax_consumed = True
        softmax, local_labels, foreign, ignored = ctx.saved_tensors
        # The saved softmax becomes the gradient in place (as in Megatron): no second [B, T, V/tp] buffer.
        grad = softmax
        own_target = (~foreign).float().unsqueeze(-1)
        grad.scatter_add_(-1, local_labels.unsqueeze(-1), -own_target)
        grad *= grad_loss.masked_fill(ignored, 0.0).unsqueeze(-1)
        return grad.to(ctx.input_dtype), None, None, None, None


def vocab_parallel_cross_entropy(
    local_logits: torch.Tensor,
    labels: torch.Tensor,
    tp_group: TPGroup = None,
    ignore_index: int = -100,
    vocab_size: int | None = None,
    reduction: str = "mean",
    check_labels: bool = True,
) -> torch.Tensor:
    """Cross entropy of vocab-sharded logits [..., V/tp] against global label ids [...], never gathering the logits.

    vocab_size: the real vocabulary; logit columns of ids >= vocab_size (TP padding) are excluded from the
    softmax (None: every column is a real token). Positions whose label is ignore_index add nothing.
    reduction: "none" (per-token losses, 0 where ignored), "sum", or "mean" over non-ignored tokens
    (0, not NaN, when every token is ignored, so a fully masked batch cannot poison training).
    check_labels: refuse label ids outside the vocabulary; the check reads values back to the host, so a
    training step whose labels the data path already validated turns it off.
    One rank holding the whole vocabulary (TP=1) takes torch's fused cross entropy; the others exchange
    only per-token statistics.
    """
    if reduction not in ("none", "sum", "mean"):
        raise NevaError(f"reduction must be 'none', 'sum' or 'mean', got {reduction!r}")
    if local_logits.shape[:-1] != labels.shape:
        raise NevaError(f"logits {tuple(local_logits.shape)} and labels {tuple(labels.shape)} do not match")
    if check_labels:
        _check_labels(labels, ignore_index, vocab_size or local_logits.shape[-1] * tp_world_size(tp_group))
    if tp_world_size(tp_group) == 1:
        losses = _whole_vocab_cross_entropy(local_logits, labels, ignore_index, vocab_size)
    else:
        losses = _VocabParallelCrossEntropy.apply(local_logits, labels, tp_group, ignore_index, vocab_size)
    if reduction == "none":
        return losses
    if reduction == "sum":
        return losses.sum()
    counted = (labels != ignore_index).sum()
    return losses.sum() / counted.clamp(min=1)


def _whole_vocab_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int,
                               vocab_size: int | None) -> torch.Tensor:
    """Per-token losses when one rank holds the whole vocabulary: torch's fused log-softmax and NLL (forward
    and backward in about half the passes over the logits of the hand-written kernel above), in fp32."""
    if vocab_size is not None and vocab_size < logits.shape[-1]:
        logits = logits[..., :vocab_size]  # TP padding columns are not tokens
    losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                             ignore_index=ignore_index, reduction="none")
    return losses.view(labels.shape)


def _check_labels(labels: torch.Tensor, ignore_index: int, vocab_size: int) -> None:
    valid = labels[labels != ignore_index]
    if valid.numel() and (int(valid.min()) < 0 or int(valid.max()) >= vocab_size):
        raise NevaError(
            f"labels must be token ids in [0, {vocab_size}) or ignore_index={ignore_index}; "
            f"got values from {int(valid.min())} to {int(valid.max())}"
        )

