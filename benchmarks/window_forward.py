"""One sliding window's forward pass on the CPU: the predictor's channels-last layout against the contiguous
layout (what nnU-Net and MONAI run), fp32 and bf16 autocast, with torch's CPU allocator asking for transparent
huge pages (``THP_MEM_ALLOC_ENABLE=1``, which cli.py sets) or not, in one run with the same seeded weights.

Each (layout, precision) runs in a fresh subprocess, so its peak resident memory is its own: the table gives the
median seconds per window over ``--repeats`` passes (after one warm-up pass) and the peak RSS added by the passes
(``ru_maxrss`` minus the resident size just before the first one). Rounds alternate the configurations, so
background load hits them alike. A last check compares the two layouts' logits on the same window.

Run with the project environment:  .venv/bin/python benchmarks/window_forward.py
(defaults: the FLARE24 network, window 128 x 128 x 96, 2 threads; --patch 40 40 32 --batch 4 is the demo's).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, format_table  # noqa: E402

LAYOUTS, PRECISIONS, HUGE_PAGES = ("contiguous", "channels_last"), ("fp32", "bf16"), ("0", "1")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--patch", type=int, nargs=3, default=[128, 128, 96], help="window size x y z")
    p.add_argument("--batch", type=int, default=1, help="windows per forward pass")
    p.add_argument("--repeats", type=int, default=3, help="timed passes per subprocess")
    p.add_argument("--rounds", type=int, default=2, help="subprocesses per configuration, alternated")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--huge-pages", nargs="+", choices=HUGE_PAGES, default=list(HUGE_PAGES),
                   help="THP_MEM_ALLOC_ENABLE values to run (default: both)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _network():
    import torch

    from lightning_flare.network import PlainConvUNet

    torch.manual_seed(0)
    net = PlainConvUNet(deep_supervision=False).eval()
    with torch.no_grad():  # affine norm parameters away from their (1, 0) init, so both layouts' use of them counts
        for name, p in net.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith("norm.bias"):
                p.uniform_(-0.5, 0.5)
    return net


def _forward(net, layout: str):
    from lightning_flare.inference import channels_last_forward

    return channels_last_forward(net) if layout == "channels_last" else net


def child(spec: dict) -> None:
    import resource
    import time

    import torch

    torch.set_num_threads(spec["threads"])
    net = _network()
    forward = _forward(net, spec["layout"])
    x = torch.randn(spec["batch"], 1, *spec["patch"], generator=torch.Generator().manual_seed(1))
    seconds = []
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=spec["precision"] == "bf16"):
        before = _rss_mb()
        for i in range(spec["repeats"] + 1):
            start = time.perf_counter()
            forward(x)
            if i:
                seconds.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps({"seconds": statistics.median(seconds), "peak_added_mb": peak - before}))


def agreement(patch, threads: int) -> list[str]:
    import torch

    torch.set_num_threads(threads)
    net = _network()
    x = torch.randn(1, 1, *patch, generator=torch.Generator().manual_seed(1))
    lines = []
    with torch.inference_mode():
        ref, got = net(x), _forward(net, "channels_last")(x)
        lines.append(f"fp32: max |channels_last - contiguous| = {(ref - got).abs().max().item():.2e} "
                     f"(logits up to {ref.abs().max().item():.2f})")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ref16, got16 = net(x).float(), _forward(net, "channels_last")(x).float()
        for name, y in (("contiguous", ref16), ("channels_last", got16)):
            agree = (y.argmax(1) == ref.argmax(1)).float().mean().item()
            lines.append(f"bf16 {name}: argmax equal to fp32 on {100 * agree:.2f}% of voxels (random weights)")
    return lines


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        child(json.loads(args.child))
        return 0
    configs = [(p, layout, thp) for p in PRECISIONS for thp in args.huge_pages for layout in LAYOUTS]
    results: dict = {c: [] for c in configs}
    print(f"load average at start: {os.getloadavg()}")
    for _ in range(args.rounds):
        for precision, layout, thp in configs:
            spec = {"layout": layout, "precision": precision, "patch": args.patch, "batch": args.batch,
                    "repeats": args.repeats, "threads": args.threads}
            env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
                       THP_MEM_ALLOC_ENABLE=thp)
            run = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], env=env, cwd=REPO,
                                 capture_output=True, text=True)
            lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
            if run.returncode or not lines:
                raise SystemExit(f"{layout} / {precision} / THP {thp} failed:\n{run.stdout[-2000:]}\n{run.stderr[-3000:]}")
            results[(precision, layout, thp)].append(json.loads(lines[-1][len("RESULT "):]))
    print(f"load average at end: {os.getloadavg()}")
    def median(key, config):
        return statistics.median(r[key] for r in results[config])

    rows = []
    for precision, layout, thp in configs:
        reference = (precision, "contiguous", args.huge_pages[0])
        s, mb = median("seconds", (precision, layout, thp)), median("peak_added_mb", (precision, layout, thp))
        rows.append([precision, layout, thp, f"{s:.3f}", f"{s / median('seconds', reference):.2f}x", f"{mb:.0f}",
                     f"{mb / median('peak_added_mb', reference):.2f}x"])
    print(format_table(["precision", "layout", "THP_MEM_ALLOC_ENABLE", "s / pass", "vs reference",
                        "peak RSS added MB", "vs reference"], rows,
                       f"FLARE24 network, {args.batch} x {tuple(args.patch)} window(s), {args.threads} threads, "
                       f"{args.rounds} rounds x {args.repeats} passes (median); reference: contiguous, "
                       f"THP_MEM_ALLOC_ENABLE={args.huge_pages[0]}, same precision"))
    print("\nSame window, both layouts:")
    for line in agreement(args.patch, args.threads):
        print("  " + line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
