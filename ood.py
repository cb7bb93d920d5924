"""Table 3's analogue (T2I-CompBench): compositions that no stage ever sees, neither pretraining nor Stage 1 nor
Stage 2, in five of T2I-CompBench's kinds that the mini world can draw and score.

  binding   [attribute binding: colour]  a colour-shape pairing no image shows, alone, counted or with another
            object ("a purple triangle", "three yellow squares", "a red diamond and a green circle")
  three     [complex]                    three different shapes in one picture ("a circle and a ring and a square");
            pretraining draws at most two different shapes together
  numeracy  [numeracy]                   counts of two shapes at once ("two circles and a square", "two rings and two
            diamonds"); pretraining counts one shape at a time
  spatial   [2D spatial]                 one coloured object above or below another ("a green circle above a purple
            square"); pretraining's relations hold between shapes in their usual colours, and its side-by-side
            pictures of coloured shapes are colour attribution's, so "left of" and "right of" are left out
  scene     [non-spatial]                an unseen binding inside a scene ("a purple triangle over the sea at dawn")

Each picture scores 1 or 0, strictly, as GenEval's own check (rewards.geneval_strict) but stricter in two ways: only
regions of at least 20 px count as objects (a speck of clutter is at most 16 px, an object at least 36 px even
blurred), and a prompt with three or more objects needs every count exact, the singular ones too (T2I-CompBench
counts every noun). A scene prompt scores 1 when its object is there, in its colour and at an object's size. The
prompts use the words the model knows (miniworld.VOCAB) within its 10-token window: what is new is the composition.
"""
import random

import torch

import miniworld as mw
import rewards

KINDS = ("binding", "three", "numeracy", "spatial", "scene")


def _unusual(shape):
    """The colours a shape may take in a new composition: not its usual one, not one of the held-out bindings."""
    return [c for c in mw.COLORS if c != mw.USUAL_COLOR[shape] and (c, shape) not in mw.OOD_BINDINGS]


def all_prompts(kind):
    """Every prompt of a kind (the grammar is finite)."""
    S, P = mw.SHAPES, mw.PLURAL
    pairs = [(a, b) for a in S for b in S if a != b]
    if kind == "binding":
        return [p for p in mw.all_prompts("geneval") if mw.is_ood(p)]
    if kind == "three":
        triples = [(a, b, c) for a, b in pairs for c in S if c not in (a, b)]
        return ([f"a {a} and a {b} and a {c}" for a, b, c in triples]
                + [f"a {col} {a} and a {b} and a {c}" for a, b, c in triples for col in _unusual(a)])
    if kind == "numeracy":  # at most four objects: the layouts the world has
        return ([f"{n} {P[a]} and a {b}" for n in ("two", "three") for a, b in pairs]
                + [f"a {a} and {n} {P[b]}" for n in ("two", "three") for a, b in pairs]
                + [f"two {P[a]} and two {P[b]}" for a, b in pairs])
    if kind == "spatial":
        return [f"a {c1} {a} {r} a {c2} {b}" for r in ("above", "below") for a, b in pairs
                for c1 in _unusual(a) for c2 in _unusual(b) if c1 != c2]
    if kind == "scene":  # not the yellow square: the sun, yellow too, may touch it, and the two read as one blob
        return [f"a {c} {s} over the {sc} at {t}" for c, s in sorted(mw.OOD_BINDINGS - {("yellow", "square")})
                for sc in mw.SCENES for t in mw.TIMES]
    raise ValueError(f"unknown out-of-distribution kind {kind!r}; kinds are {', '.join(KINDS)}")


def eval_prompts(kind, n=128):
    """n prompts of a kind (all of them if it has fewer: none is scored twice), a fixed seeded draw, the same for
    every row and every seed."""
    pool = all_prompts(kind)
    random.Random(f"ood-{kind}").shuffle(pool)
    return [{"prompt": p, "task": "geneval" if kind != "scene" else "pickscore", "kind": kind} for p in pool[:n]]


def score(images, prompts):
    """Strict 0/1 per picture (images (B, 3, H, W) in [0, 1]): every object found with its colour and count (all
    counts exact with three or more objects), the relation holding; a scene's object found in its colour."""
    found = rewards.blobs(images, min_area=20)  # objects, not specks of clutter
    out = []
    for f, p in zip(found, prompts):
        spec = mw.parse(p["prompt"] if isinstance(p, dict) else p)
        if spec["task"] == "general":
            shape, color, _ = spec["object"]
            out.append(float(any(o["shape"] == shape and o["color"] == color and max(o["w"], o["h"]) <= 16 for o in f)))
            continue
        exact = sum(k for _, _, k in spec["objects"]) >= 3
        matches = [[o for o in f if o["shape"] == s and (c is None or o["color"] == c)] for s, c, _ in spec["objects"]]
        ok = all(len(m) == k if k > 1 or exact else len(m) >= 1 for m, (_, _, k) in zip(matches, spec["objects"]))
        out.append(float(ok and (not spec["relation"] or rewards._relation_holds(spec["relation"], *matches))))
    return torch.tensor(out)


if __name__ == "__main__":  # the kinds, their sizes and an example each
    for k in KINDS:
        ps = all_prompts(k)
        print(f"{k:9s} {len(ps):4d} prompts, e.g. {ps[len(ps) // 2]!r}")
