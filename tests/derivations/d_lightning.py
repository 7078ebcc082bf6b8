import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset


class M(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.log_rows = []
        self.steps = 0

    def training_step(self, batch, idx):
        self.log_rows.append((self.current_epoch, idx, self.global_step))
        return (self.w * batch[0]).sum()

    def on_before_optimizer_step(self, opt):
        self.steps += 1

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


ds = TensorDataset(torch.ones(11, 1))
m = M()
tr = L.Trainer(
    max_epochs=2,
    accumulate_grad_batches=4,
    accelerator="cpu",
    logger=False,
    enable_checkpointing=False,
    enable_progress_bar=False,
    enable_model_summary=False,
)
tr.fit(m, DataLoader(ds, batch_size=1))
print("optimizer steps over 2 epochs:", m.steps, "final global_step", tr.global_step)
for g, (ep, idx, gs) in enumerate(m.log_rows):
    print(
        f"micro {g:2d} epoch {ep} idx {idx:2d} global_step {gs} -> real_on={ep >= 1} derived_epoch={gs // (11 // 4)} derived_on={gs // (11 // 4) >= 1}"  # noqa: E501
    )
