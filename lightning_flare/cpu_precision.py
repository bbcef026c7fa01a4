"""Is bf16 faster than fp32 on this CPU? Measured once per CPU model (and remembered), not assumed.

Machines of one kind differ: an AMD Zen 5 ran bf16 3D convolutions 2.2x faster than fp32, an Intel Xeon with AMX
about 1.6x faster, an Intel Xeon with AVX512_BF16 but no AMX 1.3-1.8x slower, and a CPU without AVX512_BF16
emulates bf16 (4x to over 100x slower). A small channels-last convolution, the network's own kind of work, is
timed in both precisions; bf16 is chosen only when it is clearly faster. Without bf16 in hardware (no
AVX512_BF16, no AMX) fp32 is chosen without timing."""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Callable

import torch

MARGIN = 0.9  # bf16 must take under 90 % of fp32's time
GIVE_UP = 3.0  # a first bf16 call over 3x fp32's time decides at once (emulated bf16 can take minutes)

_decided: dict[str, bool] = {}


def cpu_model() -> str:
    """The CPU's model name (``lscpu``'s "Model name"), or the platform's processor string."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def decision_key() -> str:
    """What the answer depends on: the CPU (model and bf16 units), torch (its oneDNN), the thread count, a oneDNN
    instruction-set cap."""
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "ALL"
    flags = [name[4:-10] for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
             if getattr(torch.cpu, name, lambda: False)()]  # virtual CPUs often share one model name
    return (f"{cpu_model()} | {'+'.join(flags) or 'no bf16 units'} | torch {torch.__version__} | "
            f"{torch.get_num_threads()} threads | isa {isa}")


def cache_file() -> Path:
    root = os.environ.get("LIGHTNING_FLARE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "lightning_flare")
    return Path(root) / "cpu_precision.json"


def choose_bf16(time_fp32: Callable[[], float], time_bf16: Callable[[], float], repeats: int = 5) -> tuple[bool, dict]:
    """Decide from timers (each call returns the seconds of one run; the first of each is a warm-up): bf16 when
    its best time is under ``MARGIN`` x fp32's. The two alternate, and the best of ``repeats`` runs counts, so
    that other work on the machine slows both alike and spikes drop out. A first bf16 run over ``GIVE_UP`` x
    fp32's decides fp32 at once. Returns the choice and the timings."""
    fp32 = [time_fp32(), time_fp32()]
    first = time_bf16()
    if first > GIVE_UP * min(fp32):
        return False, {"fp32_s": min(fp32), "bf16_first_s": first}
    bf16 = []
    for _ in range(repeats):
        bf16.append(time_bf16())
        fp32.append(time_fp32())
    best32, best16 = min(fp32[1:]), min(bf16)
    return best16 < MARGIN * best32, {"fp32_s": best32, "bf16_s": best16}


def native_bf16() -> bool:
    """Whether this x86 CPU computes bf16 in hardware (AVX512_BF16 or AMX) within the oneDNN instruction set
    allowed by ``ONEDNN_MAX_CPU_ISA``; other processors are measured (True)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return True
    cap = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "ALL").upper()
    if cap not in ("ALL", "DEFAULT") and not any(part in cap for part in ("BF16", "AMX", "AVX10")):
        return False
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if any(probe is None for probe in probes):
        return True  # this torch cannot tell: measure
    return any(probe() for probe in probes)


def _conv_timer(bf16: bool) -> Callable[[], float]:
    generator = torch.Generator().manual_seed(0)
    conv = torch.nn.Conv3d(32, 32, 3, padding=1).to(memory_format=torch.channels_last_3d)
    x = torch.randn(1, 32, 32, 32, 32, generator=generator).contiguous(memory_format=torch.channels_last_3d)

    def run() -> float:
        start = time.perf_counter()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            conv(x)
        return time.perf_counter() - start

    return run


def cpu_bf16_is_faster() -> bool:
    """True when bf16 autocast beats fp32 on this CPU: remembered in this process and in ``cache_file()``
    (per ``decision_key()``); measured (well under a second) the first time."""
    key = decision_key()
    if key in _decided:
        return _decided[key]
    path = cache_file()
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    if isinstance(known.get(key), dict) and isinstance(known[key].get("bf16_faster"), bool):
        _decided[key] = known[key]["bf16_faster"]
        return _decided[key]
    if native_bf16():
        faster, timings = choose_bf16(_conv_timer(False), _conv_timer(True))
    else:
        faster, timings = False, {}  # emulated: not worth seconds of timing
    _decided[key] = faster
    known[key] = {"bf16_faster": faster, **{k: round(v, 6) for k, v in timings.items()}}
    try:
        from .io import atomic_write

        atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(known, indent=1)))
    except OSError:
        pass  # a read-only home (a container): measured again next time
    return faster
