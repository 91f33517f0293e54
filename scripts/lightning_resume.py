"""The Python half of examples/resume_from_lightning.rs: a Lightning Fabric script with
torch.optim.AdamW() at its defaults, a warm-up + cosine schedule and clipping.

    .venv/bin/python scripts/lightning_resume.py train target/lightning/step10.ckpt
        trains steps 1-10 and saves them with fabric.save (torch.save format);
    cargo run --example resume_from_lightning -- target/lightning/step10.ckpt target/lightning/step20.ckpt
        resumes there in Rust, trains steps 11-20 and saves;
    .venv/bin/python scripts/lightning_resume.py resume target/lightning/step20.ckpt
        resumes from the Rust checkpoint with fabric.load (and prints the loss there);
    .venv/bin/python scripts/lightning_resume.py train-all
        trains steps 1-20 in Python alone, to compare the Rust run with.
"""
import sys
import warnings

import lightning as L
import torch
import torch.nn.functional as F

warnings.filterwarnings("ignore")
torch.set_num_threads(1)
STEPS = 20

# Data both halves compute alike: exact float32 arithmetic.
x = torch.arange(128, dtype=torch.float32).reshape(16, 8) / 37.0 - 1.5
y = x[:, :4] * 2.0 - x[:, 4:]

fabric = L.Fabric(accelerator="cpu", devices=1, precision="32-true")
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
optimizer = torch.optim.AdamW(model.parameters())
model, optimizer = fabric.setup(model, optimizer)
warmup = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.1, total_iters=5)
cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=STEPS - 5)
scheduler = torch.optim.lr_scheduler.SequentialLR(optimizer, [warmup, cosine], milestones=[5])


def train(first, last):
    for step in range(first, last + 1):
        optimizer.zero_grad()
        loss = F.mse_loss(model(x), y)
        fabric.backward(loss)
        fabric.clip_gradients(model, optimizer, max_norm=1.0)
        optimizer.step()
        scheduler.step()
        print(f"step {step:2}  loss {loss.item():.8f}  lr {optimizer.param_groups[0]['lr']:.3e}")


mode = sys.argv[1]
if mode == "train":
    train(1, 10)
    fabric.save(sys.argv[2], {"model": model, "optimizer": optimizer, "scheduler": scheduler,
                              "step": 10})
elif mode == "train-all":
    train(1, STEPS)
elif mode == "resume":
    state = {"model": model, "optimizer": optimizer, "scheduler": scheduler}
    rest = fabric.load(sys.argv[2], state)
    print(f"resumed at step {rest['step']}, lr {optimizer.param_groups[0]['lr']:.3e}")
    with torch.no_grad():
        print(f"loss there {F.mse_loss(model(x), y).item():.8f}")
