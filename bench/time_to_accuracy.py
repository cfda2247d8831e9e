"""Wall time to a good student: fastkd against TextBrewer and transformers' Trainer, side by side (issue #24).

    python bench/time_to_accuracy.py                # the short case: SST-2, 3x384, 1,000 examples (minutes)
    python bench/time_to_accuracy.py --full         # SST-2 and AG News, 3x384 and 3x192, the CPU profile's data
    pytest bench/bench_time_to_accuracy.py --benchmark-only [--tta-full]

The job: TinyBERT task distillation (intermediate, then prediction stage) of the packaged MiniLM teacher,
fine-tuned on the task by fastkd (its cached fine-tune, the one the run's options give), into a 3x384 and a
3x192 student, max length 64. Every contestant starts from the same student folder, reads the same tokenised
data (fastkd's loading of the same options), is evaluated by one function on the same dev subset after every
``--eval-every`` optimizer steps and at each stage's end, and runs in its own process (its peak RSS is its
own), the contestants of a case one after the other, their order rotated between repetitions (an
interleaved series). The contestants (bench/tta_engines.py):

- ``fastkd``: ``python -m fastkd.train --method tinybert`` with its defaults (on this CPU: a bf16 teacher,
  bf16 autocast, fused AdamW);
- ``fastkd-fp32``: the same with ``--teacher-dtype fp32 --amp off``: the engine alone, at TextBrewer's precision;
- ``textbrewer-copied``: TextBrewer's GeneralDistiller on TinyBERT's losses, the student initialised as its
  users do (the teacher's embeddings, mapped layers and head copied where the widths match; random at 192);
- ``textbrewer-etd``: the same with fastkd's ETD student, so ETD's share and the engine's are each visible;
- ``hf-trainer``: transformers' Trainer with a logit-KD ``compute_loss``, the ETD student, as many epochs as the
  two stages together.

Before the timed runs, a check: fastkd (fp32) and TextBrewer distil the ETD student with dropout off on the
same 10 batches per stage; their per-step losses must agree (``--loss-rtol``), so the two run the same job.

Reported per contestant: samples/s per stage, training seconds (evaluation and checkpoint writes excluded,
reported apart), seconds and optimizer steps until the dev accuracy first reaches 95% and 97% of the teacher's,
the best accuracy within a shared budget (fastkd's own training time), peak RSS. Results:
``bench/results/time-to-accuracy-<device>[-short].{json,md}`` with the machine, versions, commit and command.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.harness import device_slug, environment  # noqa: E402

CONTESTANTS = ("fastkd", "fastkd-fp32", "textbrewer-copied", "textbrewer-etd", "hf-trainer")
# --full: (task, width, training examples (None: fastkd's CPU profile), contestants). At 3x384 a TextBrewer
# user's copied student (the teacher's layers 1, 3, 5) is ETD-Impt's student (at the teacher's width ETD keeps
# every unit and takes the same layers), so textbrewer-copied runs at 3x192 only, where the two differ; the fp32
# engine-only row runs once. AG News on a 3,000-example subset keeps the table within an hour on 2 cores.
FULL_PLAN = (("sst2", 384, None, ("fastkd", "fastkd-fp32", "textbrewer-etd", "hf-trainer")),
             ("sst2", 192, None, ("fastkd", "textbrewer-copied", "textbrewer-etd", "hf-trainer")),
             ("agnews", 384, 3000, ("fastkd", "textbrewer-etd", "hf-trainer")))
STUDENTS = {384: ("3", "384", "12", "1536"), 192: ("3", "192", "12", "768")}
TARGETS = (0.95, 0.97)


def fastkd_argv(task: str, width: int, train_examples: int | None, dev_examples: int | None,
                max_length: int = 64) -> list[str]:
    """The options every contestant's job is read from: one epoch per stage (each engine's one pass over the same
    batches; on a CPU fastkd's profile caps it there anyway), batch 32."""
    layers, hidden, heads, ffn = STUDENTS[width]
    argv = ["--method", "tinybert", "--task", task, "--max-length", str(max_length), "--batch-size", "32", "--seed",
            "0", "--epochs", "1", "--student-layers", layers, "--student-hidden", hidden, "--student-heads", heads,
            "--student-ffn", ffn]
    if train_examples is not None:
        argv += ["--max-train-examples", str(train_examples)]
    if dev_examples is not None:
        argv += ["--max-dev-examples", str(dev_examples)]
    return argv


# ---------------------------------------------------------------- the shared teacher, inits and data


def prepare(task: str, width: int, argv: list[str], work: Path, log) -> dict:
    """fastkd's fine-tuned teacher (cached), its ETD student and a TextBrewer user's copied student, saved as
    folders every contestant loads; the teacher's dev accuracy on the shared dev subset."""
    from fastkd.config import parse_config
    from fastkd.models.teacher import load_model
    from fastkd.recipes import uniform_pairs
    from fastkd.training.engine import evaluate
    from fastkd.training.trainer import Trainer

    cfg = parse_config([*argv, "--etd", "impt", "--output-dir", str(work / "prepare"), "--no-progress"])
    t0 = time.perf_counter()
    tr = Trainer(cfg, log=lambda *_: None)
    tr.setup()
    setup_s = time.perf_counter() - t0
    teacher_dir = tr.teacher_paths["finetuned"]
    teacher = load_model(teacher_dir, head=True).to(tr.device).eval()  # fp32, whatever the run's teacher dtype
    teacher_acc = evaluate(teacher, tr.data["dev"], 64, tr.device, tr.pad_id)["acc"]
    inits = {"etd": work / f"init-etd-{width}", "copied": work / f"init-copied-{width}"}
    tr.module.student.save_pretrained(inits["etd"])
    pairs = uniform_pairs(tr.module.student.config.num_hidden_layers, teacher.config.num_hidden_layers)
    copied_student(teacher, tr.module.student.config, pairs, cfg.seed).save_pretrained(inits["copied"])
    no_dropout = work / f"init-etd-{width}-nodropout"
    student = type(tr.module.student).from_pretrained(inits["etd"], hidden_dropout_prob=0.0,
                                                      attention_probs_dropout_prob=0.0, classifier_dropout=0.0)
    student.save_pretrained(no_dropout)
    for folder in (*inits.values(), no_dropout):  # the teacher's tokenizer: the students read its tokens
        tr.tokenizer.save_pretrained(folder)
    tr.close(discard=True)
    log(f"{task} {width}: teacher {teacher_dir} dev acc {teacher_acc:.4f} on {len(tr.data['dev'])} examples; "
        f"fastkd set-up with ETD {setup_s:.0f}s")
    return {"teacher": str(teacher_dir), "teacher_dev_acc": teacher_acc, "inits": {k: str(v) for k, v in
            inits.items()}, "no_dropout": str(no_dropout), "train_examples": len(tr.data["task"]),
            "dev_examples": len(tr.data["dev"]), "etd_setup_s": setup_s}


def copied_student(teacher, student_config, pairs, seed: int):
    """A TextBrewer user's student: the teacher's class at the student's size, embeddings, mapped layers, pooler
    and head copied from the teacher where the widths match, else randomly initialised (seeded)."""
    torch.manual_seed(seed)
    student = type(teacher)(copy.deepcopy(student_config))
    if student_config.hidden_size != teacher.config.hidden_size:
        return student
    sd, tsd = student.state_dict(), teacher.state_dict()
    for name in sd:
        src = name
        for i, j in pairs:
            src = src.replace(f"encoder.layer.{i}.", f"encoder.layer.{j}.") if f"encoder.layer.{i}." in name else src
        if src in tsd and tsd[src].shape == sd[name].shape:
            sd[name] = tsd[src].clone()
    student.load_state_dict(sd)
    return student


# ---------------------------------------------------------------- running the contestants


def run_child(spec: dict, work: Path, log) -> dict:
    """One contestant in its own process; returns its trace with the process's wall time and peak RSS."""
    path = work / f"spec-{spec['name']}.json"
    spec = {**spec, "out": str(work / f"trace-{spec['name']}.json"), "work": str(work / spec["name"])}
    shutil.rmtree(spec["work"], ignore_errors=True)
    Path(spec["work"]).mkdir(parents=True)
    path.write_text(json.dumps(spec))
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    t0 = time.perf_counter()
    logf = open(work / f"log-{spec['name']}.txt", "w")
    proc = subprocess.Popen([sys.executable, "-m", "bench.tta_engines", str(path)], cwd=REPO, env=env,
                            stdout=logf, stderr=subprocess.STDOUT)
    proc.wait()
    logf.close()
    if proc.returncode != 0:
        tail = (work / f"log-{spec['name']}.txt").read_text()[-3000:]
        raise RuntimeError(f"contestant {spec['name']} failed (exit {proc.returncode}):\n{tail}")
    trace = json.loads(Path(spec["out"]).read_text())
    trace["wall_s"] = time.perf_counter() - t0  # peak_rss_mib: the child's own (tta_engines.peak_rss_mib)
    log(f"  {spec['name']}: {trace['wall_s']:.0f}s in all, trained {sum(s['train_s'] for s in trace['stages']):.1f}s, "
        f"final dev acc {trace['evals'][-1]['dev_acc']:.4f}, peak RSS {trace['peak_rss_mib']:.0f} MiB")
    return trace


def contestant_spec(name: str, prep: dict, argv: list[str], eval_every: int) -> dict:
    engine = name.split("-")[0] if name.startswith(("fastkd", "textbrewer")) else name
    init = "copied" if name == "textbrewer-copied" else "etd"
    spec = {"name": name, "engine": engine, "teacher": prep["teacher"], "student": prep["inits"][init],
            "fastkd_argv": argv, "eval_every": eval_every, "train_examples": prep["train_examples"], "hf_epochs": 2}
    if name == "fastkd-fp32":
        spec["extra_argv"] = ["--teacher-dtype", "fp32", "--amp", "off"]
    return spec


def check_losses(prep: dict, argv: list[str], work: Path, rtol: float, log) -> dict:
    """fastkd at TextBrewer's precision and TextBrewer, dropout off, 10 batches per stage: the same per-step
    losses, or the comparison is not of one job. fastkd's default precision is compared too (bf16's effect)."""
    small = [*argv, "--max-train-examples", "320"]
    out = {}
    for name, extra in (("fastkd-fp32", ["--teacher-dtype", "fp32", "--amp", "off"]), ("fastkd", []),
                        ("textbrewer", [])):
        spec = {"name": f"check-{name}", "engine": name.split("-")[0], "teacher": prep["teacher"],
                "student": prep["no_dropout"], "fastkd_argv": small, "eval_every": 0, "train_examples": 320,
                "extra_argv": extra}
        out[name] = run_child(spec, work, log)["losses"]
    ref = torch.tensor(out["textbrewer"], dtype=torch.float64)

    def rel(name):
        x = torch.tensor(out[name], dtype=torch.float64)
        if x.shape != ref.shape:
            return float("inf")
        return float(((x - ref).abs() / ref.abs().clamp_min(1e-12)).max())

    result = {"steps": len(ref), "max_rel_diff_fp32": rel("fastkd-fp32"), "max_rel_diff_default": rel("fastkd"),
              "rtol": rtol, "losses": out}
    result["equal"] = result["max_rel_diff_fp32"] <= rtol
    log(f"  losses over {len(ref)} steps: fastkd fp32 vs TextBrewer max relative difference "
        f"{result['max_rel_diff_fp32']:.2e} (tolerance {rtol:g}); fastkd's bf16 default "
        f"{result['max_rel_diff_default']:.2e}")
    return result


# ---------------------------------------------------------------- summaries


def summarize(trace: dict, teacher_acc: float, budget_s: float | None) -> dict:
    evals = trace["evals"]
    train_s = sum(s["train_s"] for s in trace["stages"])
    samples = sum(s["samples"] for s in trace["stages"])
    out = {"train_s": train_s, "samples_per_s": samples / train_s, "eval_s": sum(e["eval_s"] for e in evals),
           "stages": [{**s, "samples_per_s": s["samples"] / s["train_s"]} for s in trace["stages"]],
           "final_dev_acc": evals[-1]["dev_acc"], "best_dev_acc": max(e["dev_acc"] for e in evals),
           "peak_rss_mib": trace["peak_rss_mib"], "wall_s": trace["wall_s"], "capped": trace.get("capped", False)}
    for target in TARGETS:
        hit = next((e for e in evals if e["dev_acc"] >= target * teacher_acc), None)
        key = f"{round(target * 100)}pct"
        out[f"time_to_{key}_s"] = hit and hit["train_s"]
        out[f"steps_to_{key}"] = hit and hit["step"]
    if budget_s is not None:
        within = [e["dev_acc"] for e in evals if e["train_s"] <= budget_s * 1.001]
        out["best_within_budget"] = max(within) if within else None
    return out


def ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def case_table(case: dict) -> list[str]:
    rows = case["summary"]
    ref = rows.get("fastkd")
    lines = [f"### {case['task']}, student 3x{case['width']}: teacher dev acc {case['teacher_dev_acc']:.4f} "
             f"({case['dev_examples']} dev, {case['train_examples']} training examples; budget "
             f"{case['budget_s']:.1f}s = fastkd's training time)", "",
             "| contestant | samples/s (intermediate / prediction) | trained s | to 95%: s (steps) | "
             "to 97%: s (steps) | best acc in budget | final acc | eval s | peak RSS MiB | fastkd's speed-up to 97% |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in rows.items():
        rates = " / ".join(f"{s['samples_per_s']:.1f}" for s in r["stages"])

        def hit(key, r=r):
            t, n = r[f"time_to_{key}_s"], r[f"steps_to_{key}"]
            return "not reached" if t is None else f"{t:.1f} ({n})"

        speedup = ratio(r["time_to_97pct_s"], ref and ref["time_to_97pct_s"]) if name != "fastkd" else None
        capped = " (stopped)" if r["capped"] else ""
        lines.append(f"| {name} | {rates} | {r['train_s']:.1f}{capped} | {hit('95pct')} | {hit('97pct')} | "
                     f"{r.get('best_within_budget') or float('nan'):.4f} | {r['final_dev_acc']:.4f} | "
                     f"{r['eval_s']:.1f} | {r['peak_rss_mib']:.0f} | "
                     f"{'' if speedup is None else f'{speedup:.2f}x'} |")
    return lines


def headline(case: dict) -> list[str]:
    rows, out = case["summary"], []
    fk, tb = rows.get("fastkd"), rows.get("textbrewer-etd")
    if fk and tb and not tb["capped"]:
        fp32 = rows.get("fastkd-fp32")
        out.append(f"- samples/s over both stages, same batches and ETD init: fastkd "
                   f"{ratio(fk['samples_per_s'], tb['samples_per_s']):.2f}x TextBrewer's"
                   + (f" (fastkd at fp32: {ratio(fp32['samples_per_s'], tb['samples_per_s']):.2f}x)" if fp32 else ""))
    if fk and tb:
        out.append(f"- peak RSS: fastkd {ratio(fk['peak_rss_mib'], tb['peak_rss_mib']):.2f}x TextBrewer's")
    peers = {k: v for k, v in rows.items() if not k.startswith("fastkd")}
    if fk:
        for key in ("97pct", "95pct"):
            reached = {k: v[f"time_to_{key}_s"] for k, v in peers.items() if v[f"time_to_{key}_s"] is not None}
            mine = fk[f"time_to_{key}_s"]
            missed = ", ".join(k for k in peers if k not in reached) or "none"
            if mine is None:
                out.append(f"- {key[:2]}% of the teacher: fastkd did not reach it")
            elif reached:
                best = min(reached, key=reached.get)
                out.append(f"- time to {key[:2]}% of the teacher: fastkd {mine:.1f}s, best peer {best} "
                           f"{reached[best]:.1f}s: fastkd {reached[best] / mine:.2f}x faster; not reached: {missed}")
            else:
                out.append(f"- time to {key[:2]}% of the teacher: fastkd {mine:.1f}s; no peer reached it (stopped at "
                           f"{case['cap']:g}x fastkd's training time)")
    return out


def write_report(result: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    env = result["environment"]
    lines = ["# Time to accuracy: fastkd, TextBrewer and transformers' Trainer, side by side", "",
             f"Command: `{result['command']}`", "",
             f"Machine: {env['device']} ({env['cpu_count']} cores, {env['torch_threads']} torch threads); torch "
             f"{env['torch']}, transformers {env['transformers']}, TextBrewer {result.get('textbrewer')}; commit "
             f"{env['git_commit']}; {env['date']}. Generated by bench/time_to_accuracy.py; how each figure is taken "
             "is in its docstring.", ""]
    for case in result["cases"]:
        lines += case_table(case) + [""] + headline(case) + [""]
        chk = case.get("loss_check")
        if chk:
            lines += [f"Same job: with dropout off, fastkd at fp32 and TextBrewer agree on every one of "
                      f"{chk['steps']} per-step losses to a relative {chk['max_rel_diff_fp32']:.1e} (tolerance "
                      f"{chk['rtol']:g}); fastkd's bf16 default differs by at most {chk['max_rel_diff_default']:.1e}.",
                      ""]
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")


# ---------------------------------------------------------------- main


def run_case(task: str, width: int, train_examples: int | None, contestants, args, work: Path, log) -> dict:
    argv = fastkd_argv(task, width, train_examples, args.dev_examples, args.max_length)
    work.mkdir(parents=True, exist_ok=True)  # before the set-up run, whose clean-up removes the folders it made
    prep = prepare(task, width, argv, work, log)
    case = {"task": task, "width": width, "argv": argv, **{k: prep[k] for k in (
        "teacher_dev_acc", "train_examples", "dev_examples", "etd_setup_s")}, "runs": {}}
    if width == 384 and not args.no_check:
        case["loss_check"] = check_losses(prep, argv, work, args.loss_rtol, log)
    # fastkd first in each repetition: the peers stop at ``cap`` times its training time ("not reached within");
    # the peers' order rotates between repetitions.
    peers = [c for c in CONTESTANTS if c in contestants and c != "fastkd"]
    case["cap"] = args.cap
    for rep in range(args.repeats):
        order = (["fastkd"] if "fastkd" in contestants else []) + peers[rep % max(1, len(peers)):] + \
            peers[:rep % max(1, len(peers))]
        for name in order:
            spec = contestant_spec(name, prep, argv, args.eval_every)
            if name != "fastkd" and "fastkd" in case["runs"]:
                spec["max_train_s"] = args.cap * sum(s["train_s"] for s in case["runs"]["fastkd"][-1]["stages"])
            case["runs"].setdefault(name, []).append(run_child(spec, work, log))
    budget = None
    if "fastkd" in case["runs"]:
        budget = min(sum(s["train_s"] for s in t["stages"]) for t in case["runs"]["fastkd"])
    case["budget_s"] = budget or float("nan")
    # Each contestant's fastest repetition (the least disturbed by the shared machine).
    case["summary"] = {name: summarize(min(traces, key=lambda t: sum(s["train_s"] for s in t["stages"])),
                                       prep["teacher_dev_acc"], budget) for name, traces in case["runs"].items()}
    return case


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--full", action="store_true", help="the full table (FULL_PLAN: SST-2 at 3x384 and 3x192 on "
                   "fastkd's CPU profile, AG News at 3x384 on 3,000 examples); else one case from the options below")
    p.add_argument("--tasks", default="sst2", help="comma-separated tasks (default: sst2)")
    p.add_argument("--widths", default="384", help="student widths (default: 384; 192 also known)")
    p.add_argument("--train-examples", type=int, default=None, help="default: 1000 (--full: its plan's)")
    p.add_argument("--dev-examples", type=int, default=None, help="default: 300; --full: fastkd's CPU profile")
    p.add_argument("--eval-every", type=int, default=None, help="optimizer steps between evaluations "
                   "(default: 5; --full: 25)")
    p.add_argument("--contestants", default=",".join(CONTESTANTS), help="(--full: its plan's)")
    p.add_argument("--max-length", type=int, default=64, help="tokens per example (default 64; the GPU session: 128)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--cap", type=float, default=3.0, help="a peer stops after this many times fastkd's training "
                   "time (its targets then read 'not reached')")
    p.add_argument("--loss-rtol", type=float, default=1e-4)
    p.add_argument("--no-check", action="store_true", help="skip the equal-losses check")
    p.add_argument("--out", default=None, help="results path without suffix (default: bench/results/"
                   "time-to-accuracy-<device>[-short])")
    args = p.parse_args(argv)
    contestants = args.contestants.split(",")
    unknown = set(contestants) - set(CONTESTANTS)
    if unknown:
        p.error(f"--contestants: unknown {sorted(unknown)}; expected some of {CONTESTANTS}")
    if args.full:
        args.plan = FULL_PLAN
    else:
        args.dev_examples = args.dev_examples or 300
        args.plan = [(task, int(w), args.train_examples or 1000, contestants) for task in args.tasks.split(",")
                     for w in args.widths.split(",")]
    args.eval_every = args.eval_every or (25 if args.full else 5)
    return args


def main(argv=None, log=print) -> dict:
    args = parse_args(argv)
    try:
        import textbrewer
        tb_version = textbrewer.__version__
    except ImportError:
        tb_version = None
        if any(c.startswith("textbrewer") for *_, names in args.plan for c in names):
            raise SystemExit("TextBrewer is not installed: pip install -e '.[peers]' (or --contestants without "
                             "it)") from None
    work = Path(tempfile.mkdtemp(prefix="fastkd-tta-"))
    command = "python bench/time_to_accuracy.py " + " ".join(sys.argv[1:] if argv is None else argv)
    result = {"command": command.strip(), "textbrewer": tb_version, "cases": []}
    out = Path(args.out) if args.out else REPO / "bench" / "results" / (
        f"time-to-accuracy-{device_slug()}" + ("" if args.full else "-short"))
    try:
        for task, width, train_examples, contestants in args.plan:
            log(f"case {task} 3x{width}")
            result["cases"].append(run_case(task, width, train_examples, contestants, args, work / f"{task}-{width}",
                                            log))
            result["environment"] = environment()
            write_report(result, out)  # case by case: a run cut short keeps what it measured
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log(f"written: {out.with_suffix('.md')} and .json")
    result["path"] = str(out)
    return result


if __name__ == "__main__":
    main()
