"""lightning_flare: the FLARE24 nnU-Net method as a PyTorch Lightning framework."""
import os

# Must be set before torch starts OpenMP: idle threads sleep instead of spinning, so data-loader worker
# processes are not starved on machines with few cores (see cli.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
