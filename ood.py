"""Table 3's analogue (T2I-CompBench): compositions that no stage ever sees, neither pretraining nor Stage 1 nor
Stage 2, in five of T2I-CompBench's kinds that the mini world can draw and score.

  binding   [attribute binding: colour]  a colour-shape pairing no image shows, alone, counted or with another
            object ("a purple triangle", "three yellow squares", "a red diamond and a green circle")
  three     [complex]                    three different shapes in one picture ("a circle and a ring and a square");
            pretraining draws at most two different shapes together
  numeracy  [numeracy]                   counts of two shapes at once ("two circles and a square", "two rings and two
            diamonds"); pretraining counts one shape at a time
  spatial   [2D spatial]                 a relation between coloured objects ("a green circle above a purple
            square"); pretraining's relations hold between shapes in their usual colours
  scene     [non-spatial]                an unseen binding inside a scene ("a purple triangle over the sea at dawn")

The first four are scored as GenEval is (rewards.geneval_strict: every object found with its colour and count, the
relation holding); a scene prompt scores 1 when its object is found, in its colour and at an object's size. The
prompts use the words the model knows (miniworld.VOCAB) within its 10-token window: what is new is the composition.
"""
import random


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
        return [f"a {c1} {a} {r} a {c2} {b}" for r in mw.RELATIONS for a, b in pairs
                for c1 in _unusual(a) for c2 in _unusual(b) if c1 != c2]
    if kind == "scene":  # not the yellow square: the sun, yellow too, may touch it, and the two read as one blob
        return [f"a {c} {s} over the {sc} at {t}" for c, s in sorted(mw.OOD_BINDINGS - {("yellow", "square")})
                for sc in mw.SCENES for t in mw.TIMES]
    raise ValueError(f"unknown out-of-distribution kind {kind!r}; kinds are {', '.join(KINDS)}")


def eval_prompts(kind, n=128):
    """n prompts of a kind, a fixed seeded draw (the same for every row and every seed)."""
    pool = all_prompts(kind)
    random.Random(f"ood-{kind}").shuffle(pool)
    return [{"prompt": pool[i % len(pool)], "task": "geneval" if kind != "scene" else "pickscore", "kind": kind}
            for i in range(n)]


def score(images, prompts):
    """Strict 0/1 per image: GenEval's check for a composition, the object's for a scene. images (B, 3, H, W)."""
    out = rewards.geneval_strict(images, prompts)  # NaN on scene prompts
    specs = [mw.parse(p["prompt"] if isinstance(p, dict) else p) for p in prompts]
    found = rewards.blobs(images, min_area=20) if any(s["task"] == "general" for s in specs) else None
    for i, spec in enumerate(specs):
        if spec["task"] == "general":
            shape, color, _ = spec["object"]
            out[i] = float(any(o["shape"] == shape and o["color"] == color and max(o["w"], o["h"]) <= 16
                               for o in found[i]))
    return out


if __name__ == "__main__":  # the kinds, their sizes and an example each
    for k in KINDS:
        ps = all_prompts(k)
        print(f"{k:9s} {len(ps):4d} prompts, e.g. {ps[len(ps) // 2]!r}")
