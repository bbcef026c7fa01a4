"""lightning_flare: the FLARE24 nnU-Net method as a PyTorch Lightning framework."""
import os

# Must be set before torch starts OpenMP: idle threads sleep instead of spinning, so data-loader worker
# processes are not starved on machines with few cores (see cli.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# torch's CPU allocator asks for transparent huge pages for tensors of 2 MB and more (read once, at torch's
# first allocation): fewer page faults for every window's fresh activations (benchmarks/window_forward.py).
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
