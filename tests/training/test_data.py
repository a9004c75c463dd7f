"""riemix.training.data: the seeded, sharded batch order."""

from __future__ import annotations

from riemix.training.data import batch_at


def test_batch_at_is_a_seeded_sharded_permutation_per_epoch():
    items = list(range(10))
    epoch0 = [batch_at(items, i, 4, seed=3) for i in range(2)]  # 10 // 4 = 2 batches per epoch
    assert len(set(epoch0[0] + epoch0[1])) == 8  # no repeats within an epoch
    assert batch_at(items, 2, 4, seed=3) != epoch0[0]  # a new permutation in the next epoch
    assert batch_at(items, 0, 4, seed=3) == epoch0[0]  # a function of (index, seed): no iterator state
    shards = [batch_at(items, 1, 4, seed=3, rank=r, world=2) for r in range(2)]
    assert shards == [epoch0[1][0::2], epoch0[1][1::2]]
