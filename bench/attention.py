"""Speed and memory of the star GATv2 layer (`fuse.attention.star_gatv2`) against PyG's GATv2Conv.

One GATv2Conv(512, 512, heads=4, edge_dim=1) at HADA's shapes: per sample T = 2 targets (the
global nodes) attend over S sources (image: 577 BLIP tokens + 1 CLIP node, all real; caption:
13-36 BLIP tokens + 1 CLIP node, ragged, padded to the batch maximum). Timed, best of --repeats
after one untimed warm-up (which also compiles): forward, and forward + backward (`out.backward`
with a fixed random gradient; x_src and x_dst require grad, as the projections' outputs do).

Methods:
  floor     lin_l's matrix product over all N*S source rows + lin_r over the N*T targets, forward +
            backward: the dense matmuls the layer cannot avoid (padding rows included, as star_gatv2
            runs them; lin_l's bias is added inside the attention, not over its output)
  eager     star_gatv2(impl="eager")
  compiled  star_gatv2(impl="compiled") with the torch.compile'd passes (compile time reported separately)
  native    star_gatv2(impl="compiled") with its C++ loops (fuse.native; CPU float32 only)
  pyg       GATv2Conv.forward on the equivalent bipartite edge list (built outside the timing)

Timings run in one process, the methods interleaved repeat by repeat, so that a change of load
on a shared machine hits them alike. Peak memory comes from a fresh process per (case, method):
the peak during one step after the warm-up step, minus the memory held before the warm-up
(inputs and parameters): on CPU resident memory (VmHWM - VmRSS), on CUDA allocated memory.
PyG is skipped where its per-edge tensors would exceed --pyg-max-gib (estimated as
12 x E x H x C x 4 bytes), so as not to exhaust a shared machine.

On a CPU VM, every first touch of a page of a freshly allocated tensor costs microseconds
(glibc returns large blocks to the OS on free): ~0.1 s per 200 MB of new output, for every
method alike. --keep-heap keeps freed memory mapped (mallopt) and shows the times without that.

    PYTHONPATH=. python bench/attention.py                    # CPU, all cases (~25 min on 2 loaded cores)
    PYTHONPATH=. python bench/attention.py --threads 1 --cases image40 caption128 --methods floor compiled
    PYTHONPATH=. python bench/attention.py --device cuda --pyg-max-gib 60     # JSON in bench/results/
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT, HERE = Path(__file__).resolve().parents[1], Path(__file__).resolve().parent
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != HERE]

from data.logs import hide_third_party_noise  # noqa: E402

hide_third_party_noise()  # before torch_geometric is imported (by Runner)

import torch  # noqa: E402

from bench.memory import reset_peak_rss, rss_gib  # noqa: E402

WIDTH, HEADS, CHANNELS, TARGETS = 512, 4, 512, 2
CASES = {  # name: (batch, kind)
    "image40": (40, "image"), "image128": (128, "image"),
    "caption40": (40, "caption"), "caption128": (128, "caption"),
}
METHODS = ("floor", "eager", "compiled", "native", "pyg")


def make_inputs(batch: int, kind: str, device: torch.device, seed: int = 0):
    """x_src (N, S, F) zero-padded, src_mask, x_dst (N, T, F), edge_attr (N, T, S) with HADA's
    weights: rows [BLIP CLS, BLIP tokens..., CLIP global]; targets [BLIP CLS, CLIP global]."""
    g = torch.Generator().manual_seed(seed)
    blip = (torch.full((batch,), 577) if kind == "image"
            else torch.randint(13, 37, (batch,), generator=g))
    s = int(blip.max()) + 1
    rows = torch.arange(s)
    # Padded layout: BLIP rows 0..blip-1, then the CLIP node at row blip (per sample).
    clip_row = blip.unsqueeze(1)
    mask = rows < blip.unsqueeze(1) + 1
    x_src = torch.randn(batch, s, WIDTH, generator=g) * mask.unsqueeze(-1)
    x_dst = torch.stack([x_src[:, 0], x_src[torch.arange(batch), blip]], dim=1)
    is_blip = rows < clip_row
    is_cls, is_clip = rows == 0, rows == clip_row
    to_blip = torch.where(is_cls, 1.0, torch.where(is_blip, 0.9, 1.1))
    to_clip = torch.where(is_clip, 1.0, torch.where(is_cls, 1.1, 0.7))
    edge_attr = torch.stack([to_blip, to_clip], dim=1) * mask.unsqueeze(1)
    return x_src.to(device), mask.to(device), x_dst.to(device), edge_attr.to(device)


def edge_list(mask: torch.Tensor, edge_attr: torch.Tensor):
    n, s = mask.shape
    t = edge_attr.size(1)
    nn, tt, ss = torch.nonzero(mask.unsqueeze(1).expand(n, t, s), as_tuple=True)
    return torch.stack([nn * s + ss, nn * t + tt]), edge_attr[nn, tt, ss].unsqueeze(1)


def keep_heap() -> None:
    """No mmap for large blocks (M_MMAP_MAX = 0) and no trimming (M_TRIM_THRESHOLD): a freed
    tensor's pages stay mapped for the next one. On a VM each first touch of a 4 KiB page costs
    microseconds, i.e. ~0.1 s per 200 MB of fresh output."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-4, 0)
    libc.mallopt(-1, 2 ** 31 - 1)


class Runner:
    """One case's inputs and conv, and a forward(+backward) step per method."""

    def __init__(self, case: str, device: torch.device):
        from torch_geometric.nn import GATv2Conv

        torch.manual_seed(0)
        self.case, self.device = case, device
        batch, kind = CASES[case]
        self.x_src, self.mask, self.x_dst, self.edge_attr = make_inputs(batch, kind, device)
        self.conv = GATv2Conv(WIDTH, CHANNELS, heads=HEADS, edge_dim=1, add_self_loops=False,
                              dropout=0.0).to(device)
        self.x_src.requires_grad_(True)
        self.x_dst.requires_grad_(True)
        self.edges = int(self.mask.sum()) * TARGETS
        self._pyg_graph = None
        self._grads = {}

    def forward(self, method: str):
        from fuse.attention import star_gatv2

        x_src, x_dst, conv = self.x_src, self.x_dst, self.conv
        if method == "floor":
            return torch.nn.functional.linear(x_src, conv.lin_l.weight), conv.lin_r(x_dst)
        if method == "pyg":
            if self._pyg_graph is None:
                self._pyg_graph = edge_list(self.mask, self.edge_attr)
            n, s, f = x_src.shape
            return (conv((x_src.view(n * s, f), x_dst.view(-1, f)), *self._pyg_graph),)
        from fuse import native

        native.set_enabled(method == "native")  # the other methods time their own passes
        impl = "compiled" if method == "native" else method
        return (star_gatv2(conv, x_src, self.mask, x_dst, self.edge_attr, impl=impl),)

    def step(self, method: str, backward: bool) -> None:
        if not backward:
            with torch.no_grad():
                self.forward(method)
        else:
            outs = self.forward(method)
            if method not in self._grads:
                gen = torch.Generator(device=self.device).manual_seed(1)
                self._grads[method] = [torch.randn(o.shape, generator=gen, device=self.device)
                                       for o in outs]
            torch.autograd.backward(outs, self._grads[method])
            for p in [self.x_src, self.x_dst, *self.conv.parameters()]:
                p.grad = None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def timed(self, method: str, backward: bool) -> float:
        t0 = time.perf_counter()
        self.step(method, backward)
        return time.perf_counter() - t0


def peak_memory(case: str, method: str, device: torch.device) -> dict:
    """Peak memory of one forward + backward after a warm-up step, above the memory held
    before the warm-up (inputs, parameters)."""
    runner = Runner(case, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        reset_peak_rss()
        base = rss_gib()
    warm = runner.timed(method, True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        reset_peak_rss()  # compile-time memory out, the warm-up's tensors are freed
    runner.step(method, True)
    if device.type == "cuda":
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2 ** 30
    else:
        peak = rss_gib("VmHWM") - base
    return {"peak_gib": peak, "warmup_s": warm}


def pyg_gib(case: str) -> float:
    batch, kind = CASES[case]
    s = 578 if kind == "image" else 25  # mean real rows
    return 12 * batch * TARGETS * s * HEADS * CHANNELS * 4 / 2 ** 30


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=f"bench/results/attention-{os.uname().nodename}.json")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--pyg-max-gib", type=float, default=6.0)
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--keep-heap", action="store_true",
                    help="glibc: serve large blocks from the heap and keep freed memory mapped "
                         "(mallopt), so that fresh tensors do not page-fault")
    ap.add_argument("--one", nargs=2, metavar=("CASE", "METHOD"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    device = torch.device(args.device)
    if args.keep_heap:
        keep_heap()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.one:  # child process: memory of one (case, method)
        print(json.dumps(peak_memory(*args.one, device)))
        return

    load_start = [round(x, 2) for x in os.getloadavg()]
    results = []
    print(f"{'case':<11} {'method':<9} {'fwd s':>7} {'fwd+bwd s':>9} {'/floor':>7} {'peak GiB':>8}"
          f" {'warm-up s':>9}")
    if device.type != "cpu" and "native" in args.methods:
        args.methods.remove("native")  # the C++ loops are CPU-only: "native" would time the compiled passes
    for case in args.cases:
        methods = [m for m in args.methods if m != "pyg" or pyg_gib(case) <= args.pyg_max_gib]
        for m in set(args.methods) - set(methods):
            print(f"{case:<11} {m:<9} skipped (~{pyg_gib(case):.0f} GiB > --pyg-max-gib)")
            results.append({"case": case, "method": m, "skipped": "memory"})
        rows = {}
        for m in methods:  # peak memory, each in a fresh process
            proc = subprocess.run([sys.executable, __file__, "--one", case, m, "--device", args.device,
                                   "--threads", str(torch.get_num_threads())]
                                  + (["--keep-heap"] if args.keep_heap else []),
                                  capture_output=True, text=True, cwd=ROOT)
            if proc.returncode != 0:
                print(f"{case:<11} {m:<9} FAILED\n{proc.stderr[-2000:]}")
                results.append({"case": case, "method": m, "error": proc.stderr[-2000:]})
                continue
            rows[m] = {"case": case, "method": m, **json.loads(proc.stdout.strip().splitlines()[-1])}
        # Timings in one process, methods interleaved, so that a change of load hits all alike.
        runner = Runner(case, device)
        for m in rows:
            runner.step(m, True)  # warm-up (compiles)
            rows[m].update(batch=runner.x_src.size(0), sources=runner.x_src.size(1),
                           edges=runner.edges, fwd_s=float("inf"), fwd_bwd_s=float("inf"))
        for _ in range(args.repeats):
            for m, r in rows.items():
                r["fwd_s"] = min(r["fwd_s"], runner.timed(m, False))
                r["fwd_bwd_s"] = min(r["fwd_bwd_s"], runner.timed(m, True))
        floor = rows.get("floor", {}).get("fwd_bwd_s")
        for m, r in rows.items():
            r["over_floor"] = r["fwd_bwd_s"] / floor if floor else None
            ratio = f"{r['over_floor']:7.2f}" if floor else f"{'':>7}"
            print(f"{case:<11} {m:<9} {r['fwd_s']:7.3f} {r['fwd_bwd_s']:9.3f} {ratio}"
                  f" {r['peak_gib']:8.2f} {r['warmup_s']:9.1f}", flush=True)
            results.append(r)
        del runner
    info = {"keep_heap": args.keep_heap, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "nproc": os.cpu_count(),
            "device": args.device, "loadavg_start": load_start,
            "loadavg_end": [round(x, 2) for x in os.getloadavg()],
            "date": time.strftime("%Y-%m-%d %H:%M:%S"), "repeats": args.repeats,
            "shape": {"width": WIDTH, "heads": HEADS, "channels": CHANNELS, "targets": TARGETS}}
    if args.device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(args.device))
    print(f"load average {info['loadavg_start']} -> {info['loadavg_end']}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"machine": info, "results": results}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
