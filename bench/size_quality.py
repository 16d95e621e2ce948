"""Size against quality: how much of a fine-tune's gain survives at a given file size, for fixed recipes and
for `compress --budget` (data-free and with calibration data), on deltapack's offline model pairs.

    python bench/size_quality.py                                   # the default pairs, ~30 min on 2 cores
    python bench/size_quality.py --pairs llama:small:add --budgets 1 2
    python bench/size_quality.py --plot-only                       # redraw from bench/results/size_quality.json
    python bench/size_quality.py --recipes --budgets --proxy-budgets 1.1   # each proxy forced (with --data)

Gain retention = (acc_edit - acc_base) / (acc_ft - acc_base), exact match on the pair's held-out examples;
loss retention the same with the held-out loss. Bits per parameter = 8 x the whole delta file (header, kept
config/tokenizer files, dense norms included) / all the fine-tune's parameters. The edited model is exactly
what `deltapack apply` rebuilds (dp.load: bf16 weights). Calibration data for --data are fresh task examples,
disjoint from the held-out ones (pairs.task_examples).

Outputs: bench/results/size_quality.json, size_quality.md (tables) and size_quality_<pair>.png (curves).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")

# Non-saturated pairs only: the reverse pairs' fine-tunes sit at ~100 % and hide what an edit costs.
PAIRS = ["llama:small:add", "qwen2:small:add", "mistral:small:add", "llama:small:reverse-light"]
RECIPES = ["sign", "sign:scope=row", "levels:bits=2", "levels:bits=3", "quant:bits=2", "quant:bits=4",
           "sparse:p=0.9", "lowrank:rank=8", "lowrank:rank=32", "lowrank:rank=16,bits=6",
           "lowrank:bits=8/4,bands=8/16", "lowrank:bits=8/3,bands=16/32"]
BUDGETS = [0.25, 0.5, 1.1, 2.1, 3.0]


def evaluate_delta(pair, delta_path, examples, model):
    """Metrics of base + delta, rebuilt exactly as `deltapack apply` does."""
    import torch

    import deltapack as dp
    from deltapack.research import evaluation

    sd = dp.load(pair.base, delta_path)
    with torch.no_grad():
        params = dict(model.named_parameters())
        for name, t in sd.items():
            if name in params:
                params[name].copy_(t.float())
    return evaluation.evaluate(model, examples)


def build(spec: str):
    """A pair and its calibration-example maker from a spec: ARCH:SIZE:TASK for the toy builder, BASE:TASK or
    BASE:TASK:large for a pretrained base (deltapack.research.pretrained.BASES)."""
    from deltapack.research import pairs, pretrained

    parts = spec.split(":")
    if parts[0] in pretrained.BASES:
        return pretrained.build_pretrained_pair(parts[0], parts[1], large=parts[2:] == ["large"]), \
            pretrained.task_examples
    arch, size, task = parts
    return pairs.build_pair(arch, size, task=task), pairs.task_examples


def run_pair(spec: str, recipes, budgets, calib_n: int, log, proxy_budgets=(), data_budgets=None) -> dict:
    import deltapack as dp  # noqa: F401
    from deltapack import checkpoint
    from deltapack import lm
    from deltapack.research import evaluation, pairs

    t0 = time.time()
    pair, task_examples = build(spec)
    arch, size, task = pair.arch, pair.size, pair.task
    log(f"[{spec}] pair ready ({time.time() - t0:.0f}s): ft accuracy {pair.info['ft_metrics']['accuracy']:.3f}")
    examples = lm.read_data(pair.data)
    calib = task_examples(pair, calib_n)
    model = lm.load_model(pair.ft)
    m_base, m_ft = evaluation.evaluate(pair.base, examples), evaluation.evaluate(pair.ft, examples)
    n_params = sum(t.numel for t in checkpoint.Checkpoint(pair.ft).tensors.values())
    res = {"pair": spec, "arch": arch, "size": size, "task": task, "base": m_base, "ft": m_ft,
           "delta_rel_norm": pair.info.get("delta_rel_norm"), "calibration_examples": calib_n, "points": []}

    def point(kind, label, **kw):
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "d.dpk")
            t = time.time()
            s = checkpoint.compress(pair.base, pair.ft, path, **kw)
            seconds = time.time() - t
            m = evaluate_delta(pair, path, examples, model)
            bpp = 8 * os.path.getsize(path) / n_params
        gain = m_ft["accuracy"] - m_base["accuracy"]
        lgain = m_base["loss"] - m_ft["loss"]
        p = {"kind": kind, "label": label, "bits_per_param": bpp, "accuracy": m["accuracy"], "loss": m["loss"],
             "retention": (m["accuracy"] - m_base["accuracy"]) / gain if gain else float("nan"),
             "loss_retention": (m_base["loss"] - m["loss"]) / lgain if lgain else float("nan"),
             "compress_s": seconds}
        if "budget" in s:
            p["proxy"] = s["budget"]["proxy"]
            p["predicted_error"] = s["budget"]["predicted_error"]
        res["points"].append(p)
        log(f"[{spec}] {kind:10s} {label:34s} {bpp:6.3f} bits/param  acc {m['accuracy']:.3f}  "
            f"retention {100 * p['retention']:6.1f} %  loss {m['loss']:.3f}  ({seconds:.1f}s)")

    for r in recipes:
        point("recipe", r, recipe=r)
    for b in budgets:
        point("budget", f"--budget {b}", budget=b)
    for b in budgets if data_budgets is None else data_budgets:
        point("budget+data", f"--budget {b} --data", budget=b, data=calib)
    from deltapack.compress.allocate import PROXIES
    for b in proxy_budgets:
        for proxy in PROXIES:
            point(f"proxy:{proxy}", f"--budget {b} --data, proxy {proxy}", budget=b, data=calib, proxy=proxy)
    return res


def plot(results, out_dir):
    import matplotlib
    import matplotlib.ticker
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for res in results:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for kind, style in (("recipe", "o"), ("budget", "-s"), ("budget+data", "-^")):  # forced proxies: table only
            pts = sorted((p for p in res["points"] if p["kind"] == kind), key=lambda p: p["bits_per_param"])
            if not pts:
                continue
            xs, ys = [p["bits_per_param"] for p in pts], [100 * p["retention"] for p in pts]
            ax.plot(xs, ys, style, label={"recipe": "fixed recipes", "budget": "--budget (data-free)",
                                          "budget+data": "--budget --data"}[kind], alpha=0.85)
            if kind == "recipe":
                for p in pts:
                    ax.annotate(p["label"], (p["bits_per_param"], 100 * p["retention"]), fontsize=6,
                                xytext=(3, 2), textcoords="offset points")
        ax.axhline(90, color="grey", lw=0.6, ls="--")
        ax.axhline(100, color="grey", lw=0.6)
        ax.set_xscale("log")
        ax.set_xticks([0.25, 0.5, 1, 2, 4])
        ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("bits per parameter (whole file / all parameters)")
        ax.set_ylabel("gain retention, exact match (%)")
        ax.set_ylim(-5, 110)
        ax.set_title(f"{res['pair']}: base {res['base']['accuracy']:.2f}, fine-tune {res['ft']['accuracy']:.2f}, "
                     f"|ΔW|/|W| {res['delta_rel_norm'] or float('nan'):.2g}", fontsize=9)
        ax.legend(fontsize=8, loc="upper left")
        fig.tight_layout()
        path = os.path.join(out_dir, f"size_quality_{res['pair'].replace(':', '-')}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def table(results) -> str:
    lines = ["# Size against quality", "",
             "Generated by `python bench/size_quality.py` (the commands are in docs/REPRODUCTION.md). Retention = "
             "share of the fine-tune's exact-match gain over its base kept by the rebuilt model (loss retention: the "
             "same for the held-out loss); bits/param = the whole delta file over all parameters.", ""]
    for res in results:
        lines += [f"## {res['pair']}", "",
                  f"base accuracy {res['base']['accuracy']:.3f} (loss {res['base']['loss']:.3f}), fine-tune "
                  f"{res['ft']['accuracy']:.3f} (loss {res['ft']['loss']:.3f}), |ΔW|/|W| = "
                  f"{res['delta_rel_norm'] or float('nan'):.2g}", "",
                  "| kind | recipe / budget | bits/param | accuracy | retention | loss retention |",
                  "|---|---|---|---|---|---|"]
        for p in sorted(res["points"], key=lambda p: (p["kind"] != "recipe", p["kind"], p["bits_per_param"])):
            lines.append(f"| {p['kind']} | `{p['label']}`{' (' + p['proxy'] + ')' if 'proxy' in p else ''} | "
                         f"{p['bits_per_param']:.3f} | {p['accuracy']:.3f} | {100 * p['retention']:.1f} % | "
                         f"{100 * p['loss_retention']:.1f} % |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", nargs="+", default=PAIRS, metavar="ARCH:SIZE:TASK|BASE:TASK[:large]")
    ap.add_argument("--recipes", nargs="*", default=RECIPES)
    ap.add_argument("--budgets", nargs="*", type=float, default=BUDGETS)
    ap.add_argument("--proxy-budgets", nargs="*", type=float, default=[1.1],
                    help="budgets at which every proxy is also forced, with --data (default: 1.1)")
    ap.add_argument("--data-budgets", nargs="*", type=float, default=None,
                    help="budgets also run with --data (default: those of --budgets)")
    ap.add_argument("--calibration", type=int, default=256, help="calibration examples for --data (default 256)")
    ap.add_argument("--threads", type=int, default=0, help="torch and deltapack threads (default: all cores; "
                    "bound BLAS with OPENBLAS_NUM_THREADS / OMP_NUM_THREADS when another job shares the machine)")
    ap.add_argument("--out", default=RESULTS)
    ap.add_argument("--plot-only", action="store_true")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "size_quality.json")

    def log(msg):
        print(msg, flush=True)

    if args.plot_only:
        with open(path) as f:
            results = json.load(f)["pairs"]
    else:
        import torch
        import deltapack as dp
        threads = args.threads or max(1, os.cpu_count() or 1)
        torch.set_num_threads(threads)
        dp.set_threads(threads)
        results = []
        previous = {}
        if os.path.exists(path):  # keep other pairs' results when rerunning some
            with open(path) as f:
                previous = {r["pair"]: r for r in json.load(f)["pairs"]}
        for spec in args.pairs:
            results.append(run_pair(spec, args.recipes, args.budgets, args.calibration, log, args.proxy_budgets,
                                    args.data_budgets))
            if spec in previous:  # a partial rerun adds to (and replaces) that pair's points
                kept = {(p["kind"], p["label"]) for p in results[-1]["points"]}
                results[-1]["points"] = [p for p in previous[spec]["points"] if (p["kind"], p["label"]) not in kept] \
                    + results[-1]["points"]
            previous[spec] = results[-1]
            with open(path, "w") as f:
                json.dump({"pairs": list(previous.values())}, f, indent=1)
        results = list(previous.values())
    with open(os.path.join(args.out, "size_quality.md"), "w") as f:
        f.write(table(results) + "\n")
    for p in plot(results, args.out):
        log(f"wrote {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
