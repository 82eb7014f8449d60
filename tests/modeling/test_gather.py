"""Two gloo processes with gathered negatives reproduce one process on the concatenated batch."""

import importlib.util
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F


def _load_losses_file():
    """The loss file on its own, as Hub remote code runs it: the spawned workers then import torch only,
    not densecl_vit (and transformers behind it), which keeps their start-up short."""
    path = Path(__file__).resolve().parents[2] / "modeling" / "losses_densecl_vit.py"
    spec = importlib.util.spec_from_file_location("losses_densecl_vit", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


losses = _load_losses_file()

WORLD_SIZE = 2
BATCH_SIZE = 4  # concatenated batch; each process holds BATCH_SIZE // WORLD_SIZE images
NUM_PATCHES, IN_FEATURES, DIM, TEMPERATURE = 3, 6, 8, 0.2


def _make_encoder() -> torch.nn.Linear:
    torch.manual_seed(0)
    return torch.nn.Linear(IN_FEATURES, DIM).double()


def _make_views() -> tuple[torch.Tensor, torch.Tensor]:
    """Two views of the batch as token features (B, 1 + N, F): the first token stands for [CLS]."""
    generator = torch.Generator().manual_seed(1)
    shape = (BATCH_SIZE, 1 + NUM_PATCHES, IN_FEATURES)
    return tuple(torch.randn(*shape, generator=generator, dtype=torch.float64) for _ in range(2))


# Crop boxes (left, top, width, height) and flips of the two views: images overlap fully, partly, mirrored,
# or not at all, so the processes hold different numbers of matched patches.
BOXES_1 = torch.tensor(
    [[0.0, 0.0, 30.0, 10.0], [0.0, 0.0, 30.0, 10.0], [5.0, 0.0, 30.0, 10.0], [0.0, 0.0, 9.0, 9.0]]
)
BOXES_2 = torch.tensor(
    [[0.0, 0.0, 30.0, 10.0], [10.0, 0.0, 30.0, 10.0], [5.0, 0.0, 30.0, 10.0], [20.0, 20.0, 9.0, 9.0]]
)
FLIPS_1 = torch.tensor([False, False, True, False])
FLIPS_2 = torch.tensor([False, True, False, False])


def _pretraining_loss(
    encoder: torch.nn.Module,
    view_1: torch.Tensor,
    view_2: torch.Tensor,
    gather: Callable[[torch.Tensor], torch.Tensor],
    batch_offset: int,
    rows: slice = slice(None),
) -> torch.Tensor:
    """Local-to-global, global and local-to-local losses, every negative taken from `gather`ed embeddings."""
    tokens_1, tokens_2 = F.normalize(encoder(view_1), dim=-1), F.normalize(encoder(view_2), dim=-1)
    g1, l1, g2, l2 = tokens_1[:, 0], tokens_1[:, 1:], tokens_2[:, 0], tokens_2[:, 1:]
    local_global = losses.symmetric_local_global_loss(
        g1, l1, g2, l2, TEMPERATURE, gather(l1), gather(l2), batch_offset=batch_offset
    )
    local_local = losses.local_local_info_nce(
        l1, l2, BOXES_1[rows], FLIPS_1[rows], BOXES_2[rows], FLIPS_2[rows], TEMPERATURE, (1, NUM_PATCHES),
        (1, NUM_PATCHES), gather(l1), gather(l2), batch_offset,
    )  # fmt: skip
    global_term = losses.global_info_nce(g1, g2, TEMPERATURE, gather(g1), gather(g2), batch_offset)
    return local_global + global_term + local_local


def _naive_gather(tensor: torch.Tensor) -> torch.Tensor:
    """The known bug: other ranks' rows carry no gradient back to their owners."""
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.detach().contiguous())
    parts[dist.get_rank()] = tensor
    return torch.cat(parts)


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE)
    try:
        encoder = _make_encoder()
        local_batch = BATCH_SIZE // WORLD_SIZE
        rows = slice(rank * local_batch, (rank + 1) * local_batch)
        view_1, view_2 = (view[rows] for view in _make_views())
        results = {}
        for name, gather in (("with_grad", losses.gather_with_grad), ("naive", _naive_gather)):
            encoder.zero_grad()
            loss = _pretraining_loss(
                encoder, view_1, view_2, gather, losses.rank_batch_offset(local_batch), rows
            )
            loss.backward()
            # Average losses and gradients over the processes, as DDP does.
            averaged = [loss.detach()] + [p.grad.clone() for p in encoder.parameters()]
            for tensor in averaged:
                dist.all_reduce(tensor)
                tensor /= WORLD_SIZE
            results[name] = averaged
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_gathered_negatives_match_single_process(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD_SIZE)

    encoder = _make_encoder()
    loss = _pretraining_loss(encoder, *_make_views(), gather=lambda t: t, batch_offset=0)
    loss.backward()
    expected = [loss.detach()] + [p.grad for p in encoder.parameters()]

    for rank in range(WORLD_SIZE):
        results = torch.load(tmp_path / f"rank{rank}.pt")
        for got, want in zip(results["with_grad"], expected, strict=True):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        # The loss is the same either way, but a gather whose backward forgets the other ranks'
        # gradients gives a different parameter gradient: this test would catch that bug.
        assert results["naive"][0].item() == pytest.approx(loss.item(), abs=1e-5)
        largest_gap = max(
            (got - want).abs().max().item() for got, want in zip(results["naive"][1:], expected[1:])
        )
        assert largest_gap > 1e-3
