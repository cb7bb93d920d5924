"""Stage 2's cold start by model merging (the paper's "Stage 2: cold start"):

    theta = theta_base + sum_k w_k Delta_k,   Delta_k = s_k B_k A_k   (s_k = alpha_k / r_k, or alpha_k / sqrt(r_k) with rsLoRA)

    python merge.py ckpts/teachers/*.safetensors --out ckpts/merged.safetensors [--weights 0.25 0.25 0.25 0.25]

Exact: the factors are stacked, A = [A_1; ...; A_K] and B = [w_1 s_1 B_1, ..., w_K s_K B_K] with s_k each teacher's scale,
so B A = sum_k w_k Delta_k to float precision, as a LoRA of rank sum_k r_k (scale 1). Averaging A_k and B_k
separately (the official code) gives (sum_k B_k)(sum_k A_k) / K^2, cross terms B_j A_k included, which is not the
average of the deltas. Teachers trained on different bases are refused. merge_pairs, the math, needs torch alone;
reading and writing adapter files (merge_files, the command line) imports the project's LoRA files where used.
"""
import hashlib
import os

import torch


def sha256(path):
    """The content hash of an adapter file (of a folder: the weights file read_lora reads)."""
    if os.path.isdir(path):
        path = next((os.path.join(path, f) for f in ("adapter_model.safetensors", "pytorch_lora_weights.safetensors")
                     if os.path.isfile(os.path.join(path, f))), path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def merge_pairs(teachers, weights):
    """teachers: [(pairs {module: (A, B)}, scale s_k)], weights: [w_k] -> stacked pairs with B A = sum_k w_k Delta_k.
    A module that some teacher does not adapt gets a zero block from it (every module keeps the total rank)."""
    modules = sorted({m for pairs, _ in teachers for m in pairs})
    rank = {id(p): next(iter(p.values()))[0].shape[0] for p, _ in teachers}
    out = {}
    for mod in modules:
        ref_A, ref_B = next(p[mod] for p, _ in teachers if mod in p)
        As, Bs = [], []
        for (pairs, scale), w in zip(teachers, weights):
            A, B = pairs.get(mod, (torch.zeros(rank[id(pairs)], ref_A.shape[1]), torch.zeros(ref_B.shape[0], rank[id(pairs)])))
            As.append(A.float())
            Bs.append(B.float() * (w * scale))
        out[mod] = (torch.cat(As, 0), torch.cat(Bs, 1))  # (sum r, in), (out, sum r)
    return out


def merge_files(paths, weights=None):
    """Read teacher LoRAs, check they share one base, merge. Returns (pairs, metadata)."""
    import lora
    from runs import BadInput
    if not paths:
        raise BadInput("give at least one teacher to merge")
    weights = weights or [1.0 / len(paths)] * len(paths)
    if len(weights) != len(paths):
        raise BadInput(f"--weights has {len(weights)} numbers for {len(paths)} teachers; give one per teacher")
    teachers, metas = [], []
    for p in paths:
        pairs, scale, meta = lora.read_lora(p)
        teachers.append((pairs, scale))
        metas.append(meta)
    bases = {m.get("base_hash") for m in metas if m.get("base_hash")}
    if len(bases) > 1:
        who = ", ".join(f"{p} ({m.get('base_hash')})" for p, m in zip(paths, metas))
        raise BadInput(f"teachers were trained on different base models: {who}; merge teachers of one base")
    pairs = merge_pairs(teachers, weights)
    base = next((m for m in metas if m.get("base_hash")), {})
    meta = {"role": "merge", "tasks": sorted({t for m in metas for t in m.get("tasks", [])}),
            "base_path": base.get("base_path"), "base_hash": base.get("base_hash"),
            "merged_from": [{"path": p, "weight": w, "sha256": sha256(p), "tasks": m.get("tasks", [])}
                            for p, w, m in zip(paths, weights, metas)]}
    return pairs, meta


def main(argv=None):
    import checkpoints
    import lora
    import runs
    from runs import BadInput
    ap = runs.parser("Merge LoRA teachers exactly: theta_base + sum_k w_k (alpha_k/r_k) B_k A_k.")
    ap.add_argument("teachers", nargs="+", help="teacher LoRA files or peft adapter directories")
    ap.add_argument("--weights", type=float, nargs="+", default=None, help="w_k per teacher (default 1/K each)")
    ap.add_argument("--out", default="ckpts/baselines/merge.safetensors", help="the merged LoRA to write")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = ap.parse_args(argv)
    if args.weights and not all(1e-6 <= w <= 1e6 for w in args.weights):
        raise BadInput(f"--weights must be numbers from 1e-6 to 1e6 (near 1/K), got {args.weights}")
    if not args.out.endswith(".safetensors"):
        raise BadInput(f"--out {args.out}: a merge is written as safetensors; give a .safetensors path")
    if len({os.path.realpath(p) for p in args.teachers}) < len(args.teachers):
        raise BadInput("a teacher is given twice; give each teacher once (--weights sets its share)")
    checkpoints.check_out(args.out, {f"teacher {p}": p for p in args.teachers}, args.overwrite, resumable=False,
                          own=("a merge",))
    checkpoints.lock_out(args.out, 0, 1)  # two merges never write one file
    pairs, meta = merge_files(args.teachers, args.weights)
    lora.write_lora(args.out, pairs, 1.0, meta)  # scale 1: the weights and the teachers' scales live in B
    rank = next(iter(pairs.values()))[0].shape[0]
    print(f"merged {len(args.teachers)} teachers (tasks {meta['tasks']}) into {args.out}: rank {rank}, "
          f"weights {[m['weight'] for m in meta['merged_from']]}")


if __name__ == "__main__":
    import runs
    runs.run(main)
