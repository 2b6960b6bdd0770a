"""Fused ORPO loss under sequence parallelism (gloo on CPU): each rank holds a shard of every sequence's
tokens and passes the group; every rank must return the single-process loss and metrics, its hidden
gradient must be the single-process gradient of its own rows, and the weight / bias gradients must sum
over the ranks to the single-process ones."""

import pytest
import torch
from gloo_harness import run_distributed

import sealong_kernels as sk
from sealong_kernels.orpo import local_targets


def full_run(hidden, weight, bias, **kw):
    h, w, b = (x.clone().requires_grad_() for x in (hidden, weight, bias))
    loss, metrics = sk.fused_linear_orpo_loss(h, w, bias=b, chunk_size=5, **kw)
    loss.backward()
    return loss.detach(), {k: v.clone() for k, v in metrics.items()}, h.grad, w.grad, b.grad


def to_numpy(result):
    """Tensors cannot leave a finished worker through the harness' queue (torch shares them by file
    descriptor, gone when the process exits): send numpy arrays."""
    loss, metrics, *grads = result
    return loss.numpy(), {k: v.numpy() for k, v in metrics.items()}, *(g.numpy() for g in grads)


def from_numpy(result):
    loss, metrics, *grads = result
    metrics = {k: torch.from_numpy(v) for k, v in metrics.items()}
    return torch.from_numpy(loss), metrics, *(torch.from_numpy(g) for g in grads)


def classic_worker(rank, world, hidden, weight, bias, labels, strategy):
    import torch.distributed as dist

    cols = torch.arange(hidden.shape[1]).chunk(world)[rank]          # contiguous shards of T
    return to_numpy(full_run(hidden[:, cols], weight, bias, labels=labels[:, cols], strategy=strategy,
                             group=dist.group.WORLD))


def packed_worker(rank, world, hidden, weight, bias, input_ids, segments, owner, strategy):
    import torch.distributed as dist

    index, labels, seq, seg = sk.shared_prompt_targets(input_ids, segments)
    local = (owner == rank).nonzero()[:, 0]                            # this rank's global token indices
    index, labels, seq, seg = local_targets(local, index, labels, seq, seg)
    return to_numpy(full_run(hidden[local], weight, bias, labels=labels, sequence_ids=seq, segment_ids=seg,
                             hidden_index=index, num_pairs=1, strategy=strategy,
                             group=dist.group.WORLD))


def compare(per_rank, single, hidden_rows):
    per_rank = [from_numpy(r) for r in per_rank]
    loss, metrics, gh, gw, gb = single
    for rank, (loss_r, metrics_r, gh_r, _, _) in enumerate(per_rank):
        assert abs(float(loss_r) - float(loss)) <= 1e-5 * abs(float(loss))
        for name in metrics:
            assert abs(float(metrics_r[name]) - float(metrics[name])) <= 1e-5 * (1 + abs(float(metrics[name]))), name
        want = gh[hidden_rows[rank]]
        assert float((gh_r - want).norm() / want.norm().clamp(min=1e-30)) <= 1e-5, rank
    gw_sum, gb_sum = sum(r[3] for r in per_rank), sum(r[4] for r in per_rank)
    assert float((gw_sum - gw).norm() / gw.norm()) <= 1e-5 and float((gb_sum - gb).norm() / gb.norm()) <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("world,strategy", [(2, "deferred"), (2, "auto")])
def test_classic_layout_sharded_over_sequence(world, strategy):
    b, t, h, v = 2, 17, 7, 67
    hidden, weight, bias = torch.randn(2 * b, t, h), torch.randn(v, h) / 2, torch.randn(v) / 2
    labels = torch.randint(0, v, (2 * b, t))
    labels[:, :5] = -100
    labels[3, 12:] = -100
    per_rank = run_distributed(classic_worker, world, args=(hidden, weight, bias, labels, strategy))
    single = full_run(hidden, weight, bias, labels=labels, strategy=strategy)
    cols = torch.arange(t).chunk(world)
    compare(per_rank, single, [(slice(None), c) for c in cols])


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["recompute", "auto"])
def test_shared_prompt_packing_sharded_over_sequence(strategy):
    """prompt + chosen + rejected in one packed sequence, tokens dealt to 3 ranks at random: the last prompt
    token (which predicts both answers' first tokens) lives on one rank only; two-pass strategy, and the
    one-pass one (one pair: its two answers' weight-gradient accumulators folded after the all-reduce)."""
    p_len, c_len, r_len, h, v = 11, 7, 5, 9, 53
    n = p_len + c_len + r_len
    input_ids = torch.randint(0, v, (n,))
    segments = torch.tensor([0] * p_len + [1] * c_len + [2] * r_len)
    hidden, weight, bias = torch.randn(n, h), torch.randn(v, h) / 2, torch.randn(v) / 2
    owner = torch.randint(0, 3, (n,))
    owner[:3] = torch.arange(3)                                        # every rank owns at least one token
    per_rank = run_distributed(packed_worker, 3, args=(hidden, weight, bias, input_ids, segments, owner, strategy))
    index, labels, seq, seg = sk.shared_prompt_targets(input_ids, segments)
    single = full_run(hidden, weight, bias, labels=labels, sequence_ids=seq, segment_ids=seg, hidden_index=index,
                      strategy="recompute")
    compare(per_rank, single, [(owner == r).nonzero()[:, 0] for r in range(3)])
