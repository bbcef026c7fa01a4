"""lightning_flare: the FLARE24 nnU-Net method as a PyTorch Lightning framework."""
import os

# Environment defaults that torch reads once, so they are set before it loads (cli.py imports this package
# first). Idle OpenMP threads sleep instead of spinning: with loader worker processes on few cores, spinning
# threads starve the workers (measured here: 6-7 s instead of 0.75 s per training step on 2 cores).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# torch's CPU allocator asks for transparent huge pages for tensors of 2 MB and more (read once, at torch's
# first allocation): fewer page faults for every window's fresh activations (benchmarks/window_forward.py).
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
