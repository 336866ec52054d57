"""The shared lr schedule: warm-up + cosine, optionally annealed by the Trainer's time budget."""

import time

import lightning as L
import pytest
import torch

from whale_pl.lit.optim import adamw_warmup_cosine, warmup_cosine_lambda


def test_cosine_follows_the_larger_of_step_and_time_progress():
    f = warmup_cosine_lambda(2, 102, 0.1)
    assert f(0) == pytest.approx(0.5) and f(1) == pytest.approx(1.0)
    assert f(52) == pytest.approx(0.55) and f(102) == pytest.approx(0.1)
    share = [0.0]
    g = warmup_cosine_lambda(2, 102, 0.1, time_progress=lambda: share[0])
    assert g(52) == pytest.approx(0.55)  # time not yet a constraint: steps decide
    share[0] = 1.0
    assert g(10) == pytest.approx(0.1)  # the time budget is spent: bottom of the schedule
    assert g(1) == pytest.approx(1.0)  # warm-up is by steps only


class _Slow(L.LightningModule):
    def __init__(self, anneal: bool) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 1)
        self.anneal = anneal
        self.lrs: list[float] = []

    def training_step(self, batch, _):
        time.sleep(0.05)
        self.lrs.append(self.trainer.optimizers[0].param_groups[0]["lr"])
        return self.lin(batch[0]).pow(2).mean()

    def train_dataloader(self):
        x = torch.randn(64, 4)
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=4)

    def configure_optimizers(self):
        return adamw_warmup_cosine(self, lr=1e-2, warmup_steps=1, min_lr_ratio=0.1,
                                   anneal_by_time=self.anneal)


@pytest.mark.parametrize("anneal", [False, True])
def test_a_run_cut_off_by_max_time_ends_annealed_only_with_anneal_by_time(anneal):
    m = _Slow(anneal)
    L.Trainer(max_time={"seconds": 2}, max_steps=100_000, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False).fit(m)
    assert 5 < len(m.lrs) < 100_000  # stopped by time
    if anneal:
        assert m.lrs[-1] < 0.25 * 1e-2 and m.lrs[len(m.lrs) // 2] > m.lrs[-1]
    else:
        assert m.lrs[-1] > 0.99 * 1e-2  # 100k-step cosine: still at the top when time runs out
