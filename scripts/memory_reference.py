"""A training step's tensor memory on the CPU, as torch.profiler measures it, for
tests/memory.rs (which runs this script; nothing is stored).

Reads a JSON list of configs on stdin, each {"precision", "d_in", "d_hidden", "batch",
"steps"}, and for each builds a
two-layer MLP under Lightning Fabric (accelerator="cpu"), AdamW(fused=True), runs `steps - 1`
steps, then profiles the last one (forward, loss, fabric.backward, step, zero_grad is done
before) with `torch.profiler.profile(profile_memory=True)`. The profiler records every CPU
allocation and free with its size (c10's memory-reporting hook, which the default CPU
allocator calls on every thread); summed in time order they
give the step's peak rise over its start and what it left allocated at its end. Prints a JSON list,
one {"peak_rise": bytes, "end_delta": bytes, "allocations": count} per config.
"""
import json
import sys

import torch
from lightning.fabric import Fabric
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile



def allocations_of(prof):
    """Every CPU allocation (+bytes) and free (-bytes) the profiler saw, in time order, on any
    op or none (the event tree holds them all; `prof.events()` keeps only those outside an
    op)."""
    found = []

    def walk(node):
        if node.tag == _EventType.Allocation:
            found.append((node.start_time_ns, node.extra_fields.alloc_size))
        for child in node.children:
            walk(child)

    for root in prof.profiler.kineto_results.experimental_event_tree():
        walk(root)
    return [size for _, size in sorted(found)]


def measure(cfg):
    torch.manual_seed(0)
    fabric = Fabric(accelerator="cpu", devices=1, precision=cfg["precision"])
    model = torch.nn.Sequential(
        torch.nn.Linear(cfg["d_in"], cfg["d_hidden"]),
        torch.nn.ReLU(),
        torch.nn.Linear(cfg["d_hidden"], cfg["d_in"]),
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    model, optimizer = fabric.setup(model, optimizer)
    x = torch.randn(cfg["batch"], cfg["d_in"])
    y = torch.randn(cfg["batch"], cfg["d_in"])

    def step():
        out = model(x)
        loss = torch.nn.functional.mse_loss(out, y)
        fabric.backward(loss)
        optimizer.step()
        optimizer.zero_grad()

    for _ in range(cfg["steps"] - 1):
        step()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()

    sizes = allocations_of(prof)
    now = peak = 0
    for size in sizes:
        now += size
        peak = max(peak, now)
    return {"peak_rise": peak, "end_delta": now, "allocations": len(sizes)}


print(json.dumps([measure(cfg) for cfg in json.load(sys.stdin)]))
