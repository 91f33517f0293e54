"""Lightning Fabric's own DDP on 2 CPU processes, for cli/tests/ddp.rs: the worker's MLP from
the same initial weights, the same batches (torch.manual_seed(1000 + step), randn; each rank
takes rows rank, rank + 2, ... as DistributedSampler(shuffle=False)), AdamW(lr=1e-2,
fused=True), clipping to 0.5, in 32-true. Rank 0 writes the final weights (float64).

    .venv/bin/python scripts/ddp_reference.py INIT.safetensors OUT.safetensors STEPS GLOBAL_BATCH

Lightning starts the second process itself (it re-runs this script).
"""
import sys
import warnings

import lightning as L
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

warnings.filterwarnings("ignore")
torch.set_num_threads(1)
init_path, out_path, steps, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])

fabric = L.Fabric(accelerator="cpu", devices=2, strategy="ddp", precision="32-true")
fabric.launch()
init = load_file(init_path)
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
model.load_state_dict({"0.weight": init["l1.weight"], "0.bias": init["l1.bias"],
                       "2.weight": init["l2.weight"], "2.bias": init["l2.bias"]})
opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
model, opt = fabric.setup(model, opt)
rows = torch.arange(fabric.global_rank, n, fabric.world_size)
for step in range(steps):
    torch.manual_seed(1000 + step)
    x, y = torch.randn(n, 8), torch.randn(n, 4)
    opt.zero_grad()
    loss = F.mse_loss(model(x[rows]), y[rows])
    fabric.backward(loss)
    fabric.clip_gradients(model, opt, max_norm=0.5)
    opt.step()
if fabric.global_rank == 0:
    sd = model.module.state_dict()
    save_file({"l1.weight": sd["0.weight"].double(), "l1.bias": sd["0.bias"].double(),
               "l2.weight": sd["2.weight"].double(), "l2.bias": sd["2.bias"].double()}, out_path)
