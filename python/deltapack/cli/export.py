"""`deltapack export gguf-lora | gguf | peft` and `deltapack import peft` (see docs/export.md)."""
from __future__ import annotations

import importlib
import json

from .args import add_follow_links, finite_float, model_path

OUTTYPES = ["f32", "f16", "bf16", "q8_0"]
LORA_OUTTYPES = OUTTYPES + ["q5_1", "q5_0", "q4_1", "q4_0"]


def _module(name: str, needs: str):
    """Import an export module lazily, so the commands exist even when an optional package is missing."""
    try:
        return importlib.import_module(f"deltapack.{name}")
    except ImportError as ex:
        if ex.name and ex.name.split(".")[0] == "deltapack":
            raise
        raise ValueError(f"this command needs the {needs} package ({ex}); pip install {needs}") from None


def _print(report: dict, as_json: bool, summary: str) -> int:
    if as_json:
        print(json.dumps(report, indent=1))
    else:
        print(summary)
    return 0


def _lora_summary(rep: dict, what: str) -> str:
    n_svd = sum(t["source"] == "svd" for t in rep["tensors"])
    worst = max((t["rel_error"] for t in rep["tensors"]), default=0.0)
    lines = [f"wrote {rep['out']}: {what}, {len(rep['tensors'])} LoRA pairs "
             f"({len(rep['tensors']) - n_svd} stored low-rank, {n_svd} by SVD"
             + (f", worst relative error {worst:.4f}" if n_svd else "") + ")"]
    if rep.get("modules_to_save"):
        lines.append(f"modules_to_save: {', '.join(rep['modules_to_save'])}")
    if rep.get("bias") == "lora_only":
        lines.append("changed biases of LoRA layers saved (bias=lora_only)")
    left = rep["skipped"] + ([{"name": v, "reason": "vector"} for v in rep["vectors"]] if "modules_to_save" not in rep
                             else [])
    if left:
        lines.append(f"not representable ({len(left)}): "
                     + "; ".join(f"{s['name']} ({s['reason']})" for s in left))
    return "\n".join(lines)


def cmd_gguf_lora(args) -> int:
    """A llama.cpp LoRA adapter (GGUF): lowrank deltas as they are, other deltas by SVD at --rank."""
    m = _module("export.gguf", "gguf")
    rep = m.export_gguf_lora(args.base, args.file, args.output, rank=args.rank, outtype=args.outtype,
                             alpha=args.alpha, quiet=args.json, force=args.force, overwrite=args.overwrite,
                             follow_links=args.follow_links, untied_output=args.untied_output)
    return _print(rep, args.json, _lora_summary(rep, f"llama.cpp adapter for {rep['arch']}, alpha {rep['alpha']:g}"))


def cmd_gguf(args) -> int:
    """A complete GGUF model: base + alpha * delta (any codec), or the base alone when FILE is omitted."""
    m = _module("export.gguf", "gguf")
    rep = m.export_gguf_model(args.base, args.file, args.output, outtype=args.outtype, alpha=args.alpha,
                              quiet=args.json, force=args.force, overwrite=args.overwrite,
                              follow_links=args.follow_links, untied_output=args.untied_output)
    return _print(rep, args.json, f"wrote {rep['out']}: {rep['arch']} model, {rep['tensors']} tensors, "
                                  f"{rep['outtype']}, vocabulary from {rep['vocab']}")


def cmd_peft(args) -> int:
    """A PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors)."""
    m = _module("export.peft", "torch")
    try:
        import torch  # noqa: F401  (the adapter's tensors are torch tensors)
    except ImportError:
        raise ValueError("export peft needs torch; pip install torch") from None
    rep = m.export_peft(args.base, args.file, args.output, rank=args.rank, alpha=args.alpha, dtype=args.dtype,
                        force=args.force, overwrite=args.overwrite, follow_links=args.follow_links)
    return _print(rep, args.json, _lora_summary(rep, f"PEFT adapter, r={rep['r']}, lora_alpha={rep['lora_alpha']}"))


def cmd_import_peft(args) -> int:
    """A PEFT LoRA adapter as a delta file of lowrank deltas (saved modules and biases as dense deltas)."""
    m = _module("export.import_peft", "numpy")
    rep = m.import_peft(args.base, args.adapter, args.output, dtype=args.dtype, overwrite=args.overwrite,
                        follow_links=args.follow_links)
    n_lr = sum("rank" in t for t in rep["tensors"])
    return _print(rep, args.json, f"wrote {rep['out']}: {n_lr} lowrank deltas, "
                                  f"{len(rep['tensors']) - n_lr} dense deltas")


def register(sub) -> None:
    exp = sub.add_parser("export", help="export a fine-tune to llama.cpp (GGUF) or PEFT LoRA",
                         description="Export base + delta to llama.cpp (GGUF adapter or model) or to a PEFT "
                                     "LoRA adapter.")
    esub = exp.add_subparsers(dest="export_format", required=True, metavar="FORMAT")

    def common(p, file_help, optional_file=False, rank=False, outtype=None, output="a file"):
        p.add_argument("base", type=model_path, help="base model: Hugging Face directory (config.json + "
                       "safetensors), or a Hub id in the Hugging Face cache")
        p.add_argument("file", nargs="?" if optional_file else None, default=None, help=file_help)
        p.add_argument("-o", "--output", required=True, help="output path (not inside BASE)")
        p.add_argument("--overwrite", action="store_true", help=f"replace the output if it exists ({output} this "
                       "command writes, nothing else)")
        add_follow_links(p)
        if rank:
            p.add_argument("--rank", type=int, default=16, help="rank for deltas not stored low-rank (default 16)")
        if outtype == OUTTYPES:
            p.add_argument("--outtype", choices=OUTTYPES, default="f32", help="tensor type (default f32)")
        elif outtype:
            p.add_argument("--outtype", default="f32", metavar="TYPE[/TYPE]", help="factor type: one of "
                           f"{', '.join(outtype)} (default f32, exact), or A's type/B's type, e.g. q5_0/q4_0 (A, the "
                           "input side, is the more sensitive). The block types re-quantize the factors (q4_0: 4.5 "
                           "bits per value), the rank padded to whole 32-value blocks where that is smaller than f16 "
                           "(compress --rank-multiple 32 makes padding unneeded); see docs/export.md")
        p.add_argument("--alpha", type=finite_float, default=1.0, help="delta scale: base + alpha * delta (default 1)")
        p.add_argument("--force", action="store_true", help="skip the check that BASE is the delta's base")
        p.add_argument("--json", action="store_true", help="machine-readable report")

    g = esub.add_parser("gguf-lora", help="llama.cpp LoRA adapter", description=cmd_gguf_lora.__doc__)
    common(g, "delta file", rank=True, outtype=LORA_OUTTYPES, output="a GGUF file")
    g.add_argument("--untied-output", action="store_true", help="a tied embedding's delta on both its uses (token "
                   "embedding and output projection); needs a base GGUF exported with --untied-output")
    g.set_defaults(fn=cmd_gguf_lora)

    m = esub.add_parser("gguf", help="complete GGUF model (base + delta, or the base)", description=cmd_gguf.__doc__)
    common(m, "delta file (omit to export the base)", optional_file=True, outtype=OUTTYPES, output="a GGUF file")
    m.add_argument("--untied-output", action="store_true", help="write a tied-embedding model's output projection "
                   "as a tensor of its own (output.weight), so adapters made with gguf-lora --untied-output can change "
                   "it (one more embedding-sized tensor)")
    m.set_defaults(fn=cmd_gguf)

    p = esub.add_parser("peft", help="PEFT LoRA adapter directory", description=cmd_peft.__doc__)
    common(p, "delta file", rank=True, output="an adapter directory of adapter_config.json and "
           "adapter_model.safetensors")
    p.add_argument("--dtype", choices=["auto", "f32", "f16", "bf16"], default="auto",
                   help="factor dtype (auto: as stored; SVD factors f32)")
    p.set_defaults(fn=cmd_peft)

    imp = sub.add_parser("import", help="import an adapter as a delta file",
                         description="Import a PEFT LoRA adapter as a deltapack delta file.")
    isub = imp.add_subparsers(dest="import_format", required=True, metavar="FORMAT")
    ip = isub.add_parser("peft", help="PEFT LoRA adapter -> lowrank delta file", description=cmd_import_peft.__doc__)
    ip.add_argument("base", type=model_path, help="base model directory the adapter was trained on (or its Hub id)")
    ip.add_argument("adapter", help="adapter directory (adapter_config.json + adapter_model.safetensors)")
    ip.add_argument("-o", "--output", required=True, help="delta file to write")
    ip.add_argument("--overwrite", action="store_true", help="replace the output if it exists (only a deltapack file)")
    add_follow_links(ip)
    ip.add_argument("--dtype", choices=["f32", "f16", "bf16"], default=None,
                    help="factor dtype (default: the adapter's)")
    ip.add_argument("--json", action="store_true", help="machine-readable report")
    ip.set_defaults(fn=cmd_import_peft)
