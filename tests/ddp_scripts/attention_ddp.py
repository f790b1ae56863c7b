"""Train one step of a small SDPA transformer with ActivationMonitor, on 1 process (batch 16) or 2 DDP processes
(batch 8 each, gloo): the attention (``attn_*``) and output-logit (``out_*``) figures must be those of the global batch.

Usage: python attention_ddp.py OUT_DIR {single,ddp}. Rank zero writes OUT_DIR/metrics.csv through CSVLogger.
"""

import math
import sys

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from lightning_bn import ActivationMonitor


class Block(nn.Module):
    def __init__(self, dim: int = 16, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=-1))
        mask = torch.where(padding[:, None, None, :], torch.finfo(x.dtype).min, 0.0)  # HF-style additive mask
        causal = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).tril()
        mask = mask.masked_fill(~causal, torch.finfo(x.dtype).min)
        return x + self.out(F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).flatten(2))


class EagerBlock(Block):
    def forward(self, x: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=-1))
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        scores = scores.masked_fill(padding[:, None, None, :], -math.inf)
        return x + self.out((scores.softmax(-1) @ v).transpose(1, 2).flatten(2))


class Net(pl.LightningModule):
    def __init__(self, batch_size: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(11, 16)
        self.block0, self.block1 = Block(), EagerBlock()
        self.head = nn.Linear(16, 11)
        self.batch_size = batch_size
        g = torch.Generator().manual_seed(1)
        tokens = torch.randint(0, 11, (32, 7), generator=g)
        lengths = torch.randint(3, 8, (32,), generator=g)
        padding = torch.arange(7)[None, :] >= lengths[:, None]
        self.data = TensorDataset(tokens, padding)

    def forward(self, tokens: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        return self.head(self.block1(self.block0(h, padding), padding))

    def training_step(self, batch, batch_idx):
        tokens, padding = batch
        logits = self(tokens, padding)
        targets = tokens.roll(-1, dims=1).masked_fill(padding, -100)
        return F.cross_entropy(logits.transpose(1, 2), targets)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        # rank r takes samples r, r + 2, ...: the two first batches together are the single run's first batch
        sampler = DistributedSampler(self.data, shuffle=False) if self.trainer.world_size > 1 else None
        return DataLoader(self.data, batch_size=self.batch_size, sampler=sampler)


def main(out_dir: str, mode: str) -> None:
    ddp = mode == "ddp"
    net = Net(batch_size=8 if ddp else 16)
    net.example_input_array = (net.data.tensors[0][:2], net.data.tensors[1][:2])
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2 if ddp else 1,
        strategy="ddp" if ddp else "auto",
        max_steps=1,
        logger=CSVLogger(out_dir, name="", version=""),
        callbacks=[ActivationMonitor(every_n_steps=1, histograms=False, heatmap=False)],
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
    )
    trainer.fit(net)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
