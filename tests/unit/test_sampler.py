"""The resumable sampler: global batches independent of world size, mid-epoch resume."""

from __future__ import annotations

import pytest
import torch

from ftrain.core.rng import step_seed
from ftrain.data.items import mix_seed
from ftrain.data.sampler import EvalShardSampler, ResumableDistributedSampler
from ftrain.errors import InputError
from ftrain.tasks.builtin.datasets import make_synthetic


class Dummy(torch.utils.data.Dataset):
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return i


def global_batches(n, batch, world, epoch, start=0, seed=3):
    """Global batch k as the set of indices all ranks' k-th per-rank batches hold."""
    per_rank = []
    for r in range(world):
        s = ResumableDistributedSampler(Dummy(n), world, r, batch, seed)
        s.set_epoch(epoch)
        s.set_start(start)
        idx = list(s)
        assert len(idx) == len(s)
        per_rank.append([idx[i:i + batch // world] for i in range(0, len(idx), batch // world)])
    return [sorted(sum((per_rank[r][k] for r in range(world)), [])) for k in range(len(per_rank[0]))]


@pytest.mark.parametrize("world", [1, 2, 4, 8])
def test_global_batches_same_for_any_world_size(world):
    assert global_batches(1000, 64, world, epoch=1) == global_batches(1000, 64, 1, epoch=1)


def test_epoch_covers_each_sample_once_and_drops_remainder():
    batches = global_batches(1000, 64, 4, epoch=0)
    flat = [i for b in batches for i in b]
    assert len(batches) == 1000 // 64
    assert len(flat) == len(set(flat)) == 15 * 64


def test_epochs_differ_and_are_reproducible():
    assert global_batches(500, 50, 2, 0) != global_batches(500, 50, 2, 1)
    assert global_batches(500, 50, 2, 1) == global_batches(500, 50, 2, 1)


def test_resume_mid_epoch_skips_consumed_batches():
    full = global_batches(1000, 64, 4, epoch=2)
    for start in (0, 1, 7, 15):
        assert global_batches(1000, 64, 4, epoch=2, start=start) == full[start:]
    # ... and on another world size too.
    assert global_batches(1000, 64, 2, epoch=2, start=5) == full[5:]


def test_invalid_start_and_indivisible_batch():
    s = ResumableDistributedSampler(Dummy(100), 2, 0, 10, 0)
    with pytest.raises(ValueError):
        s.set_start(11)
    with pytest.raises(ValueError, match="not divisible"):
        ResumableDistributedSampler(Dummy(100), 3, 0, 10, 0)


def test_eval_shards_cover_test_set_exactly_once():
    seen = sorted(i for r in range(3) for i in EvalShardSampler(10, 3, r))
    assert seen == list(range(10))


def test_seeds_are_stable_and_distinct():
    assert mix_seed(1, 2, 3) == mix_seed(1, 2, 3)
    assert len({step_seed(0, e, b, r) for e in range(10) for b in range(4) for r in range(8)}) == 320
    assert 0 <= mix_seed(2**70, -5) < 2**63


def test_the_loops_step_seeder_seeds_every_rng_from_step_seed():
    """StepSeeder (seeds hashed in chunks on numpy, functions looked up once) puts python,
    numpy and torch in the states seeding each from step_seed(...) gives, across a chunk's
    edge and back, for large and negative seeds."""
    import random

    import numpy as np

    from ftrain.core.rng import StepSeeder
    from ftrain.data.items import mix_seeds

    cpu = torch.device("cpu")

    def draws():
        return random.random(), float(np.random.rand()), torch.rand(2).tolist()

    for seed, epoch, rank in ((0, 0, 0), (12345, 7, 3), (2**63 + 5, 1, 1), (-3, 2, 0)):
        seeder = StepSeeder(seed, epoch, rank, cpu)
        for batch in (0, 1, StepSeeder.CHUNK - 1, StepSeeder.CHUNK, 3 * StepSeeder.CHUNK, 5):
            seeder(batch)
            ours = draws()
            want = step_seed(seed, epoch, batch, rank)
            random.seed(want)
            np.random.seed(want % 2**32)
            torch.default_generator.manual_seed(want)
            assert ours == draws(), (seed, epoch, rank, batch)
    assert mix_seeds((9, 2**70), 10**6, 50, (-1, 0x5EED)) == [
        mix_seed(9, 2**70, b, -1, 0x5EED) for b in range(10**6, 10**6 + 50)]


def test_synthetic_is_deterministic_and_balanced():
    a_train, a_test = make_synthetic(7, 512, 128)
    b_train, _ = make_synthetic(7, 512, 128)
    c_train, _ = make_synthetic(8, 512, 128)
    assert torch.equal(a_train.x, b_train.x) and torch.equal(a_train.y, b_train.y)
    assert not torch.equal(a_train.x, c_train.x)
    assert a_train[3][0].shape == (1, 28, 28) and a_train[3][1].dtype == torch.int64
    assert len(a_test) == 128 and set(a_train.y.tolist()) == set(range(10))


def test_metric_sums_rows_are_the_same_exact_float64_whatever_the_sums_types():
    """A batch's sums as the loop takes them: scalar tensors of any dtype (the quick path),
    one-element tensors, Python numbers, tensors that require grad; the names checked."""
    import pytest
    import torch

    from ftrain.core.sums import MetricSums

    big = 2**40 + 3  # exact in float64, not in float32
    want = torch.tensor([1.5, float(big), 1.0], dtype=torch.float64)
    w = torch.tensor(1.5, requires_grad=True)
    for sums in ({"loss": torch.tensor(1.5), "n": torch.tensor(big), "ok": torch.tensor(True)},
                 {"loss": w * 1, "n": torch.tensor([big]), "ok": 1},
                 {"loss": 1.5, "n": big, "ok": torch.tensor([1.0], dtype=torch.float16)}):
        row = MetricSums(None, torch.device("cpu"), [], "Task").row(sums)
        assert row.dtype == torch.float64 and not row.requires_grad
        assert torch.equal(row, want)
    ms = MetricSums(None, torch.device("cpu"), ["loss", "n"], "MyTask")
    with pytest.raises(InputError, match="MyTask.loss returned the metric sums"):
        ms.row({"loss": torch.tensor(1.0)})
