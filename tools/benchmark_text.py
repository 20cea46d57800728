#!/usr/bin/env python
"""
Cold vocabulary encoding: clip's stock text tower vs our context-trimmed, deduplicated encoding,
side by side in one run, at real size with RANDOM weights.

For each variant the CLIP of its type is built with seeded random weights
(``build_clip(type, "", True, 0)``: the cost of the released model, no weight file) and the first
K LVIS v1 names (detectron2's ``LVIS_CATEGORIES``, ``name`` field, by category id) are encoded
with the 81-template ensemble twice, by the same code the cache runs on a miss
(:func:`regionspot.modeling.text_embeddings.encode_vocabulary`):

    stock  ``stock=True``: every sentence in order, ``VOCAB.BATCH_SIZE`` per forward, through
           clip's own ``CLIP.encode_text`` at the full 77-token context (what the library did
           before the fast path).
    ours   the default: each distinct sentence once, longest first, each batch run only up to
           its longest sentence.

Reported per variant: sentences/s of each path (all K x 81 sentences over the wall time of the
call), the speed-up (stock time / our time), the max |difference| of the final [K, D_t]
embeddings, and the full-LVIS cold start of each path extrapolated from those sentences/s (an
ESTIMATE: the time of a sentence depends on its length, and the subset's mean length is printed
beside the full vocabulary's). ``--full-lvis`` also times our path on all 1203 names (measured).
The machine may be shared, so the names are split into ``--rounds`` chunks (every ``rounds``-th
name) and each chunk is encoded by both paths back to back, alternating which goes first; the times
are summed over the chunks.

Text towers: BB (ViT-B/16) width 512, 12 layers; BL and BL@336 (ViT-L/14, ViT-L/14@336px) share
one of width 768, 12 layers, so BL stands for both.

Example (the command of docs/BENCHMARKS_text.md)::

    python tools/benchmark_text.py --variants BB BL --classes 24 12 --full-lvis BB
"""
import argparse
import json
import logging
import os
import platform
import sys
import time

import torch

from regionspot.benchmarking import cpu_model

logger = logging.getLogger("benchmark_text")

VARIANTS = {"BB": ("ViT-B/16", 224), "BL": ("ViT-L/14", 224), "BL336": ("ViT-L/14@336px", 336)}


def lvis_names():
    """The 1203 LVIS v1 names (``name`` field) in category-id order."""
    from detectron2.data.datasets.lvis_v1_categories import LVIS_CATEGORIES

    return [c["name"] for c in sorted(LVIS_CATEGORIES, key=lambda c: c["id"])]


def mean_tokens(names, templates) -> float:
    """Mean tokenized sentence length (SOT to EOT inclusive) of names x templates."""
    import clip

    from regionspot.modeling.text_embeddings import clean_class_name

    tokens = clip.tokenize([t.format(clean_class_name(n)) for n in names for t in templates])
    return float((tokens.argmax(dim=-1) + 1).float().mean())


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def run_variant(variant: str, k: int, batch_size: int, rounds: int, full: bool, names, templates) -> dict:
    from regionspot.modeling import text_embeddings as te
    from regionspot.modeling.clip_features import ClipDenseFeatures, build_clip

    clip_type, size = VARIANTS[variant]
    feats, build_s = timed(lambda: ClipDenseFeatures(build_clip(clip_type, "", True, 0), size))
    subset = names[:k]
    n_sentences = len(subset) * len(templates)
    # One small call of each path first, so one-off kernel set-up is not timed.
    te.encode_vocabulary(feats, subset[:1], templates[:4], batch_size, show_progress=False, stock=True)
    te.encode_vocabulary(feats, subset[:1], templates[:4], batch_size, show_progress=False)
    # The machine may be shared: the subset is split into `rounds` chunks of names and each chunk is
    # encoded by both paths back to back (which goes first alternates), so both see the same load.
    chunks = [subset[i::rounds] for i in range(rounds)]
    chunks = [c for c in chunks if c]
    seconds = {"stock": 0.0, "ours": 0.0}
    cpu_seconds = {"stock": 0.0, "ours": 0.0}
    out = {"stock": [], "ours": []}
    for i, chunk in enumerate(chunks):
        for path in (("stock", "ours") if i % 2 == 0 else ("ours", "stock")):
            logger.info("%s: %s path, round %d/%d, %d names x %d templates",
                        variant, path, i + 1, len(chunks), len(chunk), len(templates))
            cpu0 = time.process_time()
            emb, s = timed(lambda: te.encode_vocabulary(feats, chunk, templates, batch_size, stock=path == "stock"))
            cpu_seconds[path] += time.process_time() - cpu0
            seconds[path] += s
            out[path].append(emb)
    stock, ours = torch.cat(out["stock"]), torch.cat(out["ours"])
    total = len(names) * len(templates)
    row = {
        "variant": variant,
        "clip_type": clip_type,
        "text_width": feats.model.transformer.width,
        "text_layers": feats.model.transformer.layers,
        "build_s": build_s,
        "classes": len(subset),
        "rounds": len(chunks),
        "sentences": n_sentences,
        "subset_mean_tokens": mean_tokens(subset, templates),
        "stock_s": seconds["stock"],
        "ours_s": seconds["ours"],
        "stock_cpu_s": cpu_seconds["stock"],
        "ours_cpu_s": cpu_seconds["ours"],
        "stock_sentences_per_s": n_sentences / seconds["stock"],
        "ours_sentences_per_s": n_sentences / seconds["ours"],
        "speedup": seconds["stock"] / seconds["ours"],
        "max_abs_diff": float((stock - ours).abs().max()),
        "full_lvis_sentences": total,
        "full_lvis_stock_estimate_s": total * seconds["stock"] / n_sentences,
        "full_lvis_ours_estimate_s": total * seconds["ours"] / n_sentences,
    }
    if full:
        logger.info("%s: our path, all %d LVIS names (measured)", variant, len(names))
        _, row["full_lvis_ours_measured_s"] = timed(lambda: te.encode_vocabulary(feats, names, templates, batch_size))
    return row


def fmt_s(s: float) -> str:
    return f"{s:,.0f} s ({s / 60:.1f} min)"


def markdown(rows, full_mean_tokens: float) -> str:
    lines = [
        "| variant (text tower) | names x 81 | mean tokens | stock sent/s | ours sent/s | speed-up "
        "| speed-up (CPU time) | max abs diff "
        "| full LVIS stock (est.) | full LVIS ours (est.) | full LVIS ours (measured) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        measured = fmt_s(r["full_lvis_ours_measured_s"]) if "full_lvis_ours_measured_s" in r else "-"
        lines.append(
            f"| {r['variant']} ({r['clip_type']}, {r['text_width']} wide, {r['text_layers']} layers) "
            f"| {r['classes']} x 81 = {r['sentences']} | {r['subset_mean_tokens']:.1f} "
            f"| {r['stock_sentences_per_s']:.1f} | {r['ours_sentences_per_s']:.1f} | {r['speedup']:.1f}x "
            f"| {r['stock_cpu_s'] / r['ours_cpu_s']:.1f}x "
            f"| {r['max_abs_diff']:.1e} | {fmt_s(r['full_lvis_stock_estimate_s'])} "
            f"| {fmt_s(r['full_lvis_ours_estimate_s'])} | {measured} |"
        )
    lines.append("")
    lines.append(
        f"Full LVIS: 1203 x 81 = {rows[0]['full_lvis_sentences']:,} sentences, {full_mean_tokens:.1f} tokens on "
        "average "
        "(SOT to EOT); the estimates divide them by the subset's sentences/s. Speed-up = stock wall time / ours; "
        "(CPU time): the same with the process's CPU time, less sensitive to other load on the machine."
    )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--variants", nargs="+", default=["BB", "BL"], choices=sorted(VARIANTS))
    parser.add_argument("--classes", nargs="+", type=int, default=[24, 12],
                        help="first K LVIS names per variant (one value for all, or one per variant); "
                             "size it so the stock path takes 1-3 minutes")
    parser.add_argument("--batch-size", type=int, default=256, help="sentences per forward (VOCAB.BATCH_SIZE)")
    parser.add_argument("--rounds", type=int, default=2,
                        help="interleave the two paths over this many chunks of the names (fair on a shared machine)")
    parser.add_argument("--full-lvis", nargs="+", default=[], choices=sorted(VARIANTS),
                        help="variants whose fast path is also timed on all 1203 names")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if len(args.classes) not in (1, len(args.variants)):
        parser.error("--classes takes one value or one per variant")
    classes = args.classes * len(args.variants) if len(args.classes) == 1 else args.classes

    torch.set_num_threads(args.threads)
    from regionspot.modeling.text_embeddings import PROMPT_TEMPLATES

    names = lvis_names()
    machine = (
        f"{cpu_model()}, {os.cpu_count()} logical CPUs, torch {torch.__version__} with {torch.get_num_threads()} "
        f"threads, fp32, Python {platform.python_version()}"
    )
    load_before = os.getloadavg()
    rows = [
        run_variant(v, k, args.batch_size, args.rounds, v in args.full_lvis, names, PROMPT_TEMPLATES)
        for v, k in zip(args.variants, classes)
    ]
    load_after = os.getloadavg()
    print(f"\nMachine: {machine}")
    print(f"Load average (1 min) before / after: {load_before[0]:.2f} / {load_after[0]:.2f}")
    print(f"Command: python tools/benchmark_text.py {' '.join(argv if argv is not None else sys.argv[1:])}\n")
    print(markdown(rows, mean_tokens(names, PROMPT_TEMPLATES)))
    if args.json:
        with open(args.json, "w") as f:
            record = {"machine": machine, "load_before": load_before, "load_after": load_after, "rows": rows}
            json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
