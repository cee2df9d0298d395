"""Under a sharded model every process makes the same model calls: a process whose rows give it fewer micro-batches
than the busiest process makes the rest on a stand-in row weighted zero (dgpo.runtime.sharding, Processes.lockstep)."""

import torch

from dgpo.methods.batch import RolloutBatch, lockstep_chunks, random_parts
from dgpo.models.handle import PromptEmbeds
from dgpo.runtime.processes import Processes


class OneOfTwo(Processes):
    """Process ``rank`` of two whose busiest peer needs ``most`` calls (the all-reduce replaced by that number)."""

    def __init__(self, rank: int, most: int = 0, lockstep: bool = True):
        super().__init__(rank, 2)
        self.lockstep, self.most = lockstep, most

    def max(self, value: float) -> float:
        return max(value, self.most)


def test_fewer_micro_batches_are_padded_with_zero_weight_stand_ins_only_in_lockstep():
    mine = [torch.tensor([0, 1]), torch.tensor([2])]
    processes = OneOfTwo(1, most=4)
    padded, standing_in = [], []
    for chunk in lockstep_chunks(mine, processes):
        padded.append(chunk)
        standing_in.append(processes.standing_in)  # while its calls run: not counted as NFE
    assert [w for _, w in padded] == [1.0, 1.0, 0.0, 0.0] and standing_in == [False, False, True, True]
    assert not processes.standing_in
    assert all(idx.tolist() == [0] for idx, _ in padded[2:])  # row 0 stands in
    assert [w for _, w in lockstep_chunks(mine, OneOfTwo(1, most=4, lockstep=False))] == [1.0, 1.0]
    assert all(processes.standing_in for _ in lockstep_chunks(mine, processes, stand_in=True))  # a stand-in part
    assert [w for _, w in lockstep_chunks(mine, OneOfTwo(1, most=1))] == [1.0, 1.0]  # the busiest: nothing added


def _local_batch(rank: int, lockstep: bool) -> RolloutBatch:
    """Process ``rank``'s rows (rank, rank + 2, …) of a global batch of 6."""
    rows = torch.arange(rank, 6, 2)
    n = len(rows)
    return RolloutBatch(torch.randn(n, 1, 2, 2), PromptEmbeds(torch.zeros(n, 1, 1), torch.zeros(n, 1)),
                        torch.zeros(n), rows // 3, rows=rows, epoch_group_ids=torch.arange(6) // 3, total=6,
                        processes=OneOfTwo(rank, lockstep=lockstep))


def test_a_random_part_without_this_process_s_rows_gets_a_stand_in_whose_loss_counts_zero():
    for seed in range(20):  # some split gives a process no row of a part
        parts = random_parts(_local_batch(0, lockstep=True), 3, torch.Generator().manual_seed(seed))
        plain = random_parts(_local_batch(0, lockstep=False), 3, torch.Generator().manual_seed(seed))
        if any(len(p) == 0 for p in plain):
            break
    else:
        raise AssertionError("no split left process 0 without a row of a part")
    for with_stand_in, without in zip(parts, plain):
        if len(without):
            assert not with_stand_in.stand_in and torch.equal(with_stand_in.global_rows, without.global_rows)
        else:
            assert with_stand_in.stand_in and len(with_stand_in) == 1 and with_stand_in.share() == 0.0


def test_collectives_carry_cpu_values_on_the_gpu_under_nccl(monkeypatch):
    """NCCL (accelerate's backend on GPUs) carries CUDA tensors only: the rewards, counts and statistics the
    processes exchange as CPU tensors travel on this process's GPU there, and stay where they are under gloo."""
    from dgpo.runtime.processes import wire_device
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    monkeypatch.setattr(torch.distributed, "get_backend", lambda group=None: "nccl")
    assert wire_device(torch.zeros(2)) == torch.device("cuda", 3)
    monkeypatch.setattr(torch.distributed, "get_backend", lambda group=None: "gloo")
    assert wire_device(torch.zeros(2)) == torch.device("cpu")
