"""deltapack in llama.cpp: what an adapter-exact budget keeps, what reaches llama.cpp, and how llama-server serves it.

    python bench/bench_llamacpp.py                          # the project's pairs, then the server (~15 min, 2 cores)
    python bench/bench_llamacpp.py --pairs llama:small:add smollm2-135m:add --budgets 1.1
    python bench/bench_llamacpp.py --skip-quality           # the server figures only

Quality, per pair and budget (held-out exact match, gain retention = (acc - acc_base) / (acc_ft - acc_base)):
  - `--budget B` against `--budget B --lora-only`, both rebuilt as `deltapack apply` does (torch);
  - the --lora-only delta through llama.cpp (llama-cpp-python: base GGUF + adapter, f32 and the block types),
    scored the same way (teacher-forced argmax over the answer = greedy exact match) against the base GGUF;
    "kept" = its retention / the retention through deltapack apply of the same delta (goal >= 95 %);
  - sizes: the delta file, each adapter, and each block-type adapter's largest logit change from the f32 adapter.
Serving, on the first pair (bench/llama_server.py builds llama-server from the pinned llama-cpp-python's sources):
  tokens/s (median over requests, from the server's own timings) with 0, 1 and 2 adapters active, alternating
  between two adapters, and the merged fine-tune GGUF (`export gguf`); the server's start time and memory with 0,
  1 and 2 adapters loaded.
Outputs: bench/results/llamacpp.json and llamacpp.md. Say what else ran on the machine next to the figures.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
sys.path.insert(0, HERE)

PAIRS = ["llama:small:add", "qwen2:small:add", "mistral:small:add"]
BUDGETS = [0.5, 1.1, 2.1]
BLOCK_TYPES = ["q8_0", "q5_0", "q5_0/q4_0", "q4_0"]   # A/B: the input side A is the more sensitive
DELTAS = {"unrestricted": {}, "lora_only": {"lora_only": True},
          "lora_only_32": {"lora_only": True, "rank_multiple": 32}}


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def llama_accuracy(base_gguf, adapter, examples, n_ctx=512):
    """Exact match through llama.cpp: every answer position's argmax (teacher-forced) is the answer token."""
    import llama_cpp
    import numpy as np

    llm = llama_cpp.Llama(model_path=str(base_gguf), lora_path=str(adapter) if adapter else None, n_ctx=n_ctx,
                          n_batch=n_ctx, n_threads=2, logits_all=True, type_k=0, type_v=0, verbose=False)
    correct = scored = 0
    for ex in examples:
        ids, p = ex["input_ids"], ex["prompt_len"]
        if p <= 0:
            continue
        llm.reset()
        llm.eval(ids)
        pred = np.asarray(llm.scores[p - 1:len(ids) - 1]).argmax(-1)
        correct += int((pred == np.asarray(ids[p:])).all())
        scored += 1
    llm.close()
    return correct / scored


def llama_logits(base_gguf, adapter, ids):
    import llama_cpp
    import numpy as np

    llm = llama_cpp.Llama(model_path=str(base_gguf), lora_path=str(adapter), n_ctx=256, n_batch=256, n_threads=2,
                          logits_all=True, type_k=0, type_v=0, verbose=False)
    llm.eval(ids)
    out = np.array(llm.scores[:len(ids)], dtype=np.float64)
    llm.close()
    return out


def quality(spec, budgets, tmp):
    from size_quality import build, evaluate_delta

    from deltapack import checkpoint, lm
    from deltapack.export.gguf import export_gguf_lora, export_gguf_model
    from deltapack.research import evaluation

    pair, _ = build(spec)
    examples = lm.read_data(pair.data)
    model = lm.load_model(pair.ft)
    m_base, m_ft = evaluation.evaluate(pair.base, examples), evaluation.evaluate(pair.ft, examples)
    gain = m_ft["accuracy"] - m_base["accuracy"]
    n_params = sum(t.numel for t in checkpoint.Checkpoint(pair.ft).tensors.values())
    base_gguf = os.path.join(tmp, "base.gguf")
    export_gguf_model(pair.base, None, base_gguf, quiet=True, untied_output=True)   # a tied embedding too
    acc_llama_base = llama_accuracy(base_gguf, None, examples)
    res = {"pair": spec, "base": m_base["accuracy"], "ft": m_ft["accuracy"], "llama_base": acc_llama_base,
           "examples": len(examples), "points": []}
    log(f"[{spec}] base {m_base['accuracy']:.3f} (llama.cpp {acc_llama_base:.3f}), ft {m_ft['accuracy']:.3f}")
    probe = examples[0]["input_ids"]
    for b in budgets:
        point = {"bits": b}
        for kind, kw in DELTAS.items():
            path = os.path.join(tmp, f"{kind}-{b}.dpk")
            checkpoint.compress(pair.base, pair.ft, path, budget=b, **kw)
            acc = evaluate_delta(pair, path, examples, model)["accuracy"]
            point[kind] = {"bits_per_param": 8 * os.path.getsize(path) / n_params, "bytes": os.path.getsize(path),
                           "accuracy": acc, "retention": (acc - m_base["accuracy"]) / gain, "adapters": {}}
        for kind, outtypes in (("lora_only", ["f32"]), ("lora_only_32", ["f32"] + BLOCK_TYPES)):
            delta, adapters = os.path.join(tmp, f"{kind}-{b}.dpk"), point[kind]["adapters"]
            for outtype in outtypes:
                path = os.path.join(tmp, f"adapter-{kind}-{b}-{outtype.replace('/', '-')}.gguf")
                rep = export_gguf_lora(pair.base, delta, path, outtype=outtype, quiet=True, untied_output=True)
                acc = llama_accuracy(base_gguf, path, examples)
                retention = (acc - acc_llama_base) / gain
                adapters[outtype] = {"bytes": rep["bytes"], "accuracy": acc, "retention": retention,
                                     "kept": retention / point[kind]["retention"] if point[kind]["retention"] else None,
                                     "size_vs_delta": rep["bytes"] / point[kind]["bytes"],
                                     "energy_not_carried": rep["energy"]["vectors"] + rep["energy"]["skipped"]}
                if outtype != "f32":
                    got, exact = (llama_logits(base_gguf, os.path.join(tmp, f"adapter-{kind}-{b}-{t}.gguf"), probe)
                                  for t in (outtype.replace("/", "-"), "f32"))
                    adapters[outtype]["max_logit_change"] = float(abs(got - exact).max() / abs(exact).max())
        res["points"].append(point)
        log(f"[{spec}] {b} bits: --budget {100 * point['unrestricted']['retention']:.1f} %, --lora-only "
            f"{100 * point['lora_only']['retention']:.1f} % (llama.cpp f32 "
            f"{100 * point['lora_only']['adapters']['f32']['retention']:.1f} %), --rank-multiple 32 "
            f"{100 * point['lora_only_32']['retention']:.1f} %; through llama.cpp "
            + ", ".join(f"{t} {100 * a['retention']:.1f} % ({a['size_vs_delta']:.2f}x)"
                        for t, a in point["lora_only_32"]["adapters"].items()))
    return res, pair


def rss_mib(pid):
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def serving(pair, budgets, tmp, requests, n_predict):
    import llama_server

    from deltapack import checkpoint
    from deltapack.export.gguf import export_gguf_lora, export_gguf_model

    binary = llama_server.build(quiet=False)
    base_gguf = os.path.join(tmp, "serve-base.gguf")
    export_gguf_model(pair.base, None, base_gguf, quiet=True, untied_output=True)
    adapters, merged = [], os.path.join(tmp, "merged.gguf")
    for b in budgets[-2:]:
        delta = os.path.join(tmp, f"serve-{b}.dpk")
        checkpoint.compress(pair.base, pair.ft, delta, budget=b, lora_only=True, rank_multiple=32)
        adapters.append(os.path.join(tmp, f"serve-{b}.gguf"))
        export_gguf_lora(pair.base, delta, adapters[-1], outtype="q5_0", quiet=True, untied_output=True)
    export_gguf_model(pair.base, delta, merged, quiet=True)
    from deltapack import lm
    prompts = [ex["input_ids"][:ex["prompt_len"]] for ex in lm.read_data(pair.data)[:requests]]
    out = {"n_predict": n_predict, "requests": len(prompts), "start": {}, "tokens_per_s": {}}

    def run(server, lora_for):
        speeds, walls = [], []
        for i, p in enumerate(prompts):
            t = time.perf_counter()
            r = server.post("/completion", {"prompt": p, "n_predict": n_predict, "temperature": 0.0, "top_k": 1,
                                            "ignore_eos": True, "lora": lora_for(i), "cache_prompt": False})
            walls.append(time.perf_counter() - t)
            speeds.append(r["timings"]["predicted_per_second"])
        return {"median": statistics.median(speeds), "wall_median_s": statistics.median(walls)}

    for n in (0, 1, 2):
        t = time.perf_counter()
        with llama_server.Server(binary, base_gguf, adapters[:n], threads=2, parallel=1) as s:
            out["start"][n] = {"seconds": time.perf_counter() - t, "rss_mib": rss_mib(s.proc.pid)}
            if n == 0:
                out["tokens_per_s"]["base, no adapter loaded"] = run(s, lambda i: [])
            if n == 2:
                off = [{"id": 0, "scale": 0.0}, {"id": 1, "scale": 0.0}]
                out["tokens_per_s"]["2 loaded, 0 active"] = run(s, lambda i: off)
                out["tokens_per_s"]["1 active"] = run(s, lambda i: [{"id": 0, "scale": 1.0}])
                out["tokens_per_s"]["2 active"] = run(s, lambda i: [{"id": 0, "scale": 1.0}, {"id": 1, "scale": 1.0}])
                out["tokens_per_s"]["alternating A/B"] = run(s, lambda i: [{"id": i % 2, "scale": 1.0}])
    with llama_server.Server(binary, merged, threads=2, parallel=1) as s:
        out["tokens_per_s"]["merged fine-tune GGUF"] = run(s, lambda i: [])
    out["adapter_bytes"] = [os.path.getsize(a) for a in adapters]
    for k, v in out["tokens_per_s"].items():
        log(f"[server] {k:28s} {v['median']:8.1f} tokens/s, {1000 * v['wall_median_s']:.1f} ms per request")
    for n, v in out["start"].items():
        log(f"[server] {n} adapters: ready in {v['seconds']:.2f} s, RSS {v['rss_mib']:.1f} MiB")
    return out


def markdown(results, server) -> str:
    lines = ["# deltapack in llama.cpp", "", "Generated by `python bench/bench_llamacpp.py`. Gain retention on the "
             "pair's held-out examples (exact match), with the bits per parameter used; `kept` = retention through "
             "llama.cpp / retention of the same delta through `deltapack apply`; `size` = adapter bytes / delta file "
             "bytes; `logit` = the largest logit change from the f32 adapter over the largest logit, on one example. "
             "Base GGUF and adapters with --untied-output.", ""]
    for res in results:
        lines += [f"## {res['pair']} (base {res['base']:.3f}, fine-tune {res['ft']:.3f}, {res['examples']} examples)",
                  "", "| bits | --budget | --lora-only | llama.cpp f32 kept | --lora-only --rank-multiple 32 | "
                  + " | ".join(f"{t}: kept, size, logit" for t in ["f32"] + BLOCK_TYPES) + " | not carried (energy) |",
                  "|---|---|---|---|---|" + "---|" * (len(BLOCK_TYPES) + 1) + "---|"]
        for p in res["points"]:
            u, lo, lo32 = p["unrestricted"], p["lora_only"], p["lora_only_32"]
            a = lo32["adapters"]
            cells = [f"{100 * a[t]['kept']:.1f} %, {a[t]['size_vs_delta']:.2f}x"
                     + (f", {a[t]['max_logit_change']:.1e}" if "max_logit_change" in a[t] else "")
                     for t in ["f32"] + BLOCK_TYPES]
            first = " | ".join(f"{100 * d['retention']:.1f} % ({d['bits_per_param']:.2f})" for d in (u, lo))
            lines.append(f"| {p['bits']} | {first} | {100 * lo['adapters']['f32']['kept']:.1f} % | "
                         f"{100 * lo32['retention']:.1f} % "
                         f"({lo32['bits_per_param']:.2f}) | " + " | ".join(cells)
                         + f" | {100 * a['f32']['energy_not_carried']:.2f} % |")
        lines.append("")
    if server:
        lines += ["## llama-server", "", f"{server['requests']} requests of {server['n_predict']} tokens, one slot, "
                  "2 threads; median of the server's own predicted tokens/s; q5_0 adapters of `--budget 1.1` and "
                  "`--budget 2.1` (`--lora-only --rank-multiple 32`).", "", "| configuration | tokens/s | "
                  "ms per request |", "|---|---|---|"]
        for k, v in server["tokens_per_s"].items():
            lines.append(f"| {k} | {v['median']:.1f} | {1000 * v['wall_median_s']:.1f} |")
        lines += ["", "| adapters loaded | ready in (s) | RSS (MiB) |", "|---|---|---|"]
        for n, v in server["start"].items():
            lines.append(f"| {n} | {v['seconds']:.2f} | {v['rss_mib']:.1f} |")
        lines.append(f"\nadapter sizes: {', '.join(f'{b:,} B' for b in server['adapter_bytes'])}")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", nargs="+", default=PAIRS)
    ap.add_argument("--budgets", nargs="+", type=float, default=BUDGETS)
    ap.add_argument("--skip-quality", action="store_true")
    ap.add_argument("--skip-server", action="store_true")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--n-predict", type=int, default=64)
    args = ap.parse_args()
    results, server = [], None
    with tempfile.TemporaryDirectory() as tmp:
        first = None
        for spec in args.pairs:
            if args.skip_quality:
                from size_quality import build
                first = first or build(spec)[0]
                continue
            d = os.path.join(tmp, spec.replace(":", "_"))
            os.mkdir(d)
            res, pair = quality(spec, args.budgets, d)
            results.append(res)
            first = first or pair
        if not args.skip_server:
            server = serving(first, args.budgets, tmp, args.requests, args.n_predict)
    os.makedirs(RESULTS, exist_ok=True)
    previous = os.path.join(RESULTS, "llamacpp.json")
    if os.path.exists(previous):   # a part skipped keeps its last figures
        with open(previous) as fh:
            old = json.load(fh)
        results = old.get("quality", []) if args.skip_quality else results
        server = old.get("server") if args.skip_server else server
    with open(os.path.join(RESULTS, "llamacpp.json"), "w") as fh:
        json.dump({"quality": results, "server": server}, fh, indent=1)
    with open(os.path.join(RESULTS, "llamacpp.md"), "w") as fh:
        fh.write(markdown(results, server))
    log(f"wrote {RESULTS}/llamacpp.md")


if __name__ == "__main__":
    main()
