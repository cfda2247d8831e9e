"""``fastkd.hf.DistillationTrainer`` (public path ``fastkd.hf``): any fastkd method inside the transformers ``Trainer``.

>>> trainer = DistillationTrainer(model=student, teacher_model=teacher, method="tinybert",
...                               args=TrainingArguments("out", report_to="tensorboard"),
...                               train_dataset=ds["train"], eval_dataset=ds["validation"], processing_class=tok)
>>> trainer.train()          # every stage of the method, in order
>>> trainer.save_model()     # a clean student: AutoModelForSequenceClassification.from_pretrained("out")

No ``compute_loss`` to write. The model the Trainer trains is a :class:`fastkd.Distiller` (the student plus the
recipe's projection and EMD layer weights), so DDP under ``torchrun`` and the optimizer see those too; the frozen
teacher is outside it (not wrapped, not saved, moved to the batch's device on first use). Saving writes the
student alone with ``save_pretrained`` (and the tokenizer); a checkpoint adds ``fastkd_distiller.safetensors``
(the projection and layer weights), which a resume restores.

**Stages.** ``trainer.train()`` runs every stage of the method in sequence, each with a fresh optimizer and
schedule as in ``fastkd.train``. A ``learning_rate`` or ``num_train_epochs`` the user set in ``TrainingArguments``
(a value other than its default) applies to every stage; otherwise a stage takes the recipe's (the paper's; set
them with ``settings={"tinybert.inter_epochs": 2}``, or ``epochs=`` for every stage, like ``--epochs``); each
stage logs which values it uses and where they came from. The other ``TrainingArguments`` (batch size, weight
decay, warm-up, clipping, precision, logging, saving, ``max_steps`` per stage) apply to every stage. With more than
one stage each writes its checkpoints under ``<output_dir>/stage-<n>-<name>/``;
``train(resume_from_checkpoint=True)`` skips the finished stages and resumes the interrupted one from its last
checkpoint.

Per-term losses (``loss_att_mse``, ``loss_soft_ce``, ...) go through ``Trainer.log``, so every ``report_to``
integration (TensorBoard, W&B, ...) records them. With more than one stage every record is tagged by stage
(``intermediate/loss_att_mse``, ``eval_prediction/loss``) and logged at the run's global step, and TensorBoard
writes one run folder for all stages. ``trainer.stage_logs`` keeps every stage's ``log_history``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from pathlib import Path

import datasets
import torch
from transformers import DataCollatorWithPadding, Trainer, TrainerCallback
from transformers.trainer_utils import get_last_checkpoint
from transformers.utils import logging

from fastkd.data import DataNotFoundError, pick_split, prepare_dataset
from fastkd.distill.distiller import Distiller, split_student_state

logger = logging.get_logger(__name__)
EXTRAS_NAME = "fastkd_distiller.safetensors"
STAGE_DONE = "fastkd_stage_done.json"


def explicit_training_values(args) -> dict[str, float]:
    """The stage values a user set in TrainingArguments: learning_rate and num_train_epochs where they differ
    from TrainingArguments' own defaults (a value equal to the default cannot be told from an unset one: it
    leaves the recipe's value in place)."""
    if args is None:
        return {}
    fields = {f.name: f.default for f in dataclasses.fields(args)}
    return {k: getattr(args, k) for k in ("learning_rate", "num_train_epochs") if getattr(args, k) != fields[k]}


def stage_tag(key: str, stage: str) -> str:
    """A log key tagged with its stage, after the Trainer's eval_/test_ prefix (which TensorBoard turns into the
    eval/ and test/ sections): eval_loss -> eval_<stage>/loss, loss_att_mse -> <stage>/loss_att_mse."""
    for prefix in ("eval_", "test_"):
        if key.startswith(prefix):
            return f"{prefix}{stage}/{key[len(prefix):]}"
    return f"{stage}/{key}"


class _AfterStep(TrainerCallback):
    """BERT-EMD's layer-weight update after every optimizer step."""

    def __init__(self, distiller: Distiller):
        self.distiller = distiller

    def on_step_end(self, args, state, control, **kwargs):
        self.distiller.after_step()


def load_student_weights(distiller: Distiller, folder: str | os.PathLike) -> None:
    """The student's weights (``model.safetensors``) and the distiller's extras from a checkpoint folder."""
    from safetensors.torch import load_file

    folder = Path(folder)
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"resume_from_checkpoint: {folder} has no model.safetensors (not a checkpoint of a "
                                f"DistillationTrainer)")
    student = distiller.student
    missing, unexpected = student.load_state_dict(load_file(weights), strict=False)
    # save_pretrained leaves out tied weights; a missing key is fine only when it shares storage with a loaded one.
    params = dict(student.named_parameters(remove_duplicate=False))
    loaded = {params[k].data_ptr() for k in params if k not in missing}
    untied = [k for k in missing if k not in params or params[k].data_ptr() not in loaded]
    if unexpected or untied:
        raise ValueError(f"resume_from_checkpoint: {weights} does not fit the student (missing {untied[:4]}, "
                         f"unexpected {unexpected[:4]})")
    extras = folder / EXTRAS_NAME
    if extras.is_file():
        state = load_file(extras)
        got = distiller.load_state_dict(state, strict=False)
        if got.unexpected_keys:
            raise ValueError(f"resume_from_checkpoint: {extras} holds keys the distiller lacks: "
                             f"{got.unexpected_keys[:4]}")


class DistillationTrainer(Trainer):
    """The HF ``Trainer`` for distillation: ``model`` is the student, ``teacher_model`` the teacher (one model,
    or {"pretrained": m, "finetuned": m} for ERNIE-Tiny), ``method`` a fastkd method name or recipe.

    ``train_dataset`` / ``eval_dataset``: tokenised datasets (``input_ids``, ``label``), or raw ones (a ``text``
    column, optionally ``text_pair``, and ``label``) that are tokenised with ``processing_class`` up to
    ``max_length`` tokens; a ``DatasetDict`` gives its train split (and its validation split when
    ``eval_dataset`` is not given). ``general_dataset``: unlabelled text for the stages that read general data
    (ERNIE-Tiny's first two; default: ``train_dataset``). ``augmented_dataset``: ``train_dataset`` with augmented
    copies (:func:`fastkd.augment.augment`) for the stages whose paper trains on augmented data (TinyBERT's
    intermediate stage, BERT-EMD; default: ``train_dataset``). The other keyword arguments are the Trainer's."""

    def __init__(self, model=None, teacher_model=None, method="kd", args=None, train_dataset=None,
                 eval_dataset=None, processing_class=None, data_collator=None, *, settings: dict | None = None,
                 mode: str = "task", kept_hidden: torch.Tensor | None = None, teacher_dtype: str = "auto",
                 epochs: int | None = None, general_dataset=None, max_length: int = 128, cache: str = "off",
                 augmented_dataset=None, **kwargs):
        if model is None or teacher_model is None:
            raise ValueError("model, teacher_model: DistillationTrainer needs the student (model=) and the teacher "
                             "(teacher_model=)")
        user_values = explicit_training_values(args)
        if epochs is not None:
            if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
                raise ValueError(f"epochs: expected a positive int (every stage's epochs), got {epochs!r}")
            if user_values.get("num_train_epochs", epochs) != epochs:
                raise ValueError(f"epochs: {epochs} and args.num_train_epochs={args.num_train_epochs} disagree; set "
                                 f"one of them")
        distiller = Distiller(teacher_model, model, method, settings=settings, mode=mode, kept_hidden=kept_hidden,
                              teacher_dtype=teacher_dtype, cache=cache, epochs=epochs)
        if eval_dataset is None and isinstance(train_dataset, datasets.DatasetDict):
            with contextlib.suppress(DataNotFoundError):
                eval_dataset = pick_split(train_dataset, "dev", "train_dataset")
        if isinstance(eval_dataset, datasets.DatasetDict):
            eval_dataset = pick_split(eval_dataset, "dev", "eval_dataset")
        train_dataset = prepare_dataset(train_dataset, processing_class, max_length, "train_dataset")
        eval_dataset = prepare_dataset(eval_dataset, processing_class, max_length, "eval_dataset")
        self.general_dataset = prepare_dataset(general_dataset, processing_class, max_length, "general_dataset")
        self.augmented_dataset = prepare_dataset(augmented_dataset, processing_class, max_length,
                                                 "augmented_dataset")
        if data_collator is None:
            if processing_class is None:
                raise ValueError("processing_class: pass the tokenizer (it pads the batches and is saved with the "
                                 "student), or a data_collator")
            data_collator = DataCollatorWithPadding(processing_class)
        if kwargs.get("compute_loss_func") is not None:
            raise ValueError("compute_loss_func: DistillationTrainer computes the method's losses itself; choose "
                             "them with method= and settings=")
        if args is not None and args.label_smoothing_factor:
            raise ValueError(f"args.label_smoothing_factor: {args.label_smoothing_factor} would not be applied (the "
                             f"recipe's hard_ce is plain cross entropy, its soft_ce the teacher's distribution); "
                             f"set it to 0")
        callbacks = [*(kwargs.pop("callbacks", None) or []), _AfterStep(distiller)]
        super().__init__(model=distiller, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                         processing_class=processing_class, data_collator=data_collator, callbacks=callbacks,
                         **kwargs)
        self.distiller = distiller
        self.user_values = user_values
        self._step_offset = 0  # the finished stages' optimizer steps: the run's global step is offset by them
        self.task_dataset = train_dataset
        self._term_sums: dict[str, torch.Tensor] = {}
        self._term_count = 0
        self._in_checkpoint = False
        self.stage_logs: dict[str, list[dict]] = {}  # each stage's log_history (the Trainer's own is per train())

    # ------------------------------------------------------------ the loss and its logging

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = model(**inputs)
        if model.training:  # summed on the device; one transfer per logging step, in log()
            for k, v in out.terms.items():
                self._term_sums[k] = self._term_sums.get(k, 0.0) + v.detach().float()
            self._term_count += 1
        return (out.loss, out) if return_outputs else out.loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        return super().prediction_step(model, inputs, prediction_loss_only, [*(ignore_keys or []), "terms"])

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self._term_count and "loss" in logs:
            names = list(self._term_sums)
            means = torch.stack([self._term_sums[k] for k in names]) / self._term_count
            if self.args.world_size > 1:
                means = self.accelerator.reduce(means, reduction="mean")
            logs.update({f"loss_{k}": v for k, v in zip(names, means.tolist(), strict=True)})
            self._term_sums, self._term_count = {}, 0
        if len(self.distiller.stages) == 1:
            super().log(logs, start_time)
            return
        # Each stage is a train() of its own, which restarts the Trainer's step and epoch. Every record is tagged
        # with its stage (eval_loss -> eval/<stage>/loss in TensorBoard, epoch -> train/<stage>/epoch) and logged at
        # the run's global step (the finished stages' steps plus this one's), so the curves of two stages neither
        # share a tag nor a step.
        epoch, step = self.state.epoch, self.state.global_step
        if epoch is not None:
            logs = {**logs, "epoch": epoch}
        self.state.epoch, self.state.global_step = None, step + self._step_offset
        try:
            super().log({stage_tag(k, self.distiller.stage.name): v for k, v in logs.items()}, start_time)
        finally:
            self.state.epoch, self.state.global_step = epoch, step

    # ------------------------------------------------------------ the stages

    def _stage_dir(self, base: str, i: int) -> Path:
        if len(self.distiller.stages) == 1:
            return Path(base)
        return Path(base) / f"stage-{i + 1}-{self.distiller.stages[i].name}"

    def _set_stage_data(self, i: int) -> None:
        stage = self.distiller.stages[i]
        general = stage.data == "general" and self.general_dataset is not None
        augmented = stage.augmented and stage.data == "task" and self.augmented_dataset is not None
        self.train_dataset = self.general_dataset if general else self.augmented_dataset if augmented else \
            self.task_dataset

    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, ignore_keys_for_eval=None,
              **kwargs):
        """Every stage in order; ``resume_from_checkpoint=True`` resumes at the last checkpoint of the first
        unfinished stage (a path: that checkpoint, whose stage is read from its folder)."""
        args, base = self.args, self.args.output_dir
        saved = args.output_dir, args.learning_rate, args.num_train_epochs
        self._step_offset = 0
        start, ckpt = self._resume_point(resume_from_checkpoint, base)
        self._one_tensorboard_folder(base)
        result = None
        try:
            for i, stage in enumerate(self.distiller.stages):
                if i < start or stage.epochs == 0:
                    continue
                out_dir = self._stage_dir(base, i)
                self.distiller.set_stage(i)
                self._set_stage_data(i)
                args.output_dir = str(out_dir)
                args.learning_rate, args.num_train_epochs = self._stage_values(i, stage)
                self.optimizer, self.lr_scheduler = None, None
                self._term_sums, self._term_count = {}, 0  # a stage's last partial logging window stays its own
                result = super().train(resume_from_checkpoint=ckpt if i == start else None, trial=trial,
                                       ignore_keys_for_eval=ignore_keys_for_eval, **kwargs)
                self.stage_logs[stage.name] = list(self.state.log_history)
                self._step_offset += self.state.global_step
                if len(self.distiller.stages) > 1:
                    self._finish_stage(out_dir, i)
        finally:
            args.output_dir, args.learning_rate, args.num_train_epochs = saved
        return result

    def _stage_values(self, i: int, stage) -> tuple[float, float]:
        """A stage's (learning rate, epochs): a value set in TrainingArguments wins (for every stage), else the
        recipe's; the log says which, and where each came from."""
        lr = self.user_values.get("learning_rate", stage.lr)
        epochs = self.user_values.get("num_train_epochs", stage.epochs)
        source = {k: "TrainingArguments" if k in self.user_values else f"the {self.distiller.recipe.method} recipe"
                  for k in ("learning_rate", "num_train_epochs")}
        logger.warning(f"fastkd: stage {i + 1}/{len(self.distiller.stages)} ({stage.name}): {epochs:g} epoch(s) "
                       f"({source['num_train_epochs']}), learning rate {lr:g} ({source['learning_rate']})")
        return lr, epochs

    def _one_tensorboard_folder(self, base: str) -> None:
        """Every stage's TensorBoard events in one run folder under the run's output_dir (the callback would
        otherwise keep the first stage's folder for all of them); TENSORBOARD_LOGGING_DIR still wins."""
        from transformers.integrations import TensorBoardCallback
        from transformers.integrations.integration_utils import default_logdir

        for cb in self.callback_handler.callbacks:
            if isinstance(cb, TensorBoardCallback) and cb.logging_dir is None:
                cb.logging_dir = os.path.join(base, default_logdir())

    def _resume_point(self, resume, base: str) -> tuple[int, str | None]:
        """(first stage to run, the checkpoint it resumes from); finished stages' students are loaded."""
        if not resume:
            return 0, None
        n = len(self.distiller.stages)
        if isinstance(resume, (str, os.PathLike)):
            parent = Path(resume).resolve().parent
            for i in range(n):
                if self._stage_dir(base, i).resolve() == parent:
                    self._continue_after(base, i)
                    return i, str(resume)
            raise ValueError(f"resume_from_checkpoint: {resume} is not in a stage folder of {base} "
                             f"({[str(self._stage_dir(base, i)) for i in range(n)]})")
        for i in range(n):
            stage_dir = self._stage_dir(base, i)
            if n > 1 and (stage_dir / STAGE_DONE).is_file():
                continue
            self._continue_after(base, i)
            last = get_last_checkpoint(str(stage_dir)) if stage_dir.is_dir() else None
            if last is None and i == 0:
                raise ValueError(f"resume_from_checkpoint: no checkpoint in {stage_dir}")
            return i, last
        return n, None  # every stage finished

    def _continue_after(self, base: str, i: int) -> None:
        """Before resuming stage i: the student as stage i - 1 left it, and the run's global step where it was."""
        if i == 0:
            return
        previous = self._stage_dir(base, i - 1)
        load_student_weights(self.distiller, previous / "final")
        marker = previous / STAGE_DONE
        self._step_offset = json.loads(marker.read_text()).get("global_step", 0) if marker.is_file() else 0

    def _finish_stage(self, out_dir: Path, i: int) -> None:
        """The stage's end state (student + extras) and a marker, so a resume starts the next stage from it."""
        if self.args.should_save:
            self._in_checkpoint = True
            try:
                self._save(str(out_dir / "final"))
            finally:
                self._in_checkpoint = False
            (out_dir / STAGE_DONE).write_text(json.dumps({"stage": i, "name": self.distiller.stages[i].name,
                                                          "global_step": self._step_offset}))
        self.accelerator.wait_for_everyone()  # other ranks may read final/ on a later resume, never before this

    # ------------------------------------------------------------ saving and loading a clean student

    def _save_checkpoint(self, model, trial) -> None:
        self._in_checkpoint = True
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._in_checkpoint = False

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """The student alone (``save_pretrained``) and the tokenizer; in a checkpoint also the extras."""
        from safetensors.torch import save_file

        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        student, extras = split_student_state(state_dict if state_dict is not None else self.distiller.state_dict())
        self.distiller.student.save_pretrained(output_dir, state_dict=student)
        if self._in_checkpoint:
            extras = {k: v.detach().contiguous() for k, v in extras.items()}
            if extras:
                save_file(extras, os.path.join(output_dir, EXTRAS_NAME))
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        load_student_weights(self.distiller, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        load_student_weights(self.distiller, self.state.best_model_checkpoint)
