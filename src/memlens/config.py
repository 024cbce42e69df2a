"""Run configuration: pydantic models, YAML loading and ``key=value`` overrides.

This module is the one home of defaults. Every model forbids unknown keys, so a misspelt key is an error that names
the nearest valid key, never a silently ignored setting.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from memlens.errors import MemlensError
from memlens.provenance import json_hash

LogicalTarget = Literal["q", "k", "v", "o", "qkv", "gate", "up", "down"]
Precision = Literal["auto", "float32", "bfloat16"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SplitSpec(_Strict):
    """Which records to draw, from which split of the source."""

    split: str | None = Field(
        None, description="split name (phee/synthetic: train, dev, test; jsonl/csv: all); None = the source's default"
    )
    n: int | None = Field(None, ge=1, description="number of records, drawn at random with data.seed; None = all")


class OneRunSpec(_Strict):
    """Canaries of the one-run privacy audit (Steinke, Nasr and Jagielski 2023; see :mod:`memlens.one_run`): new
    formatted texts, each put into the training set once with probability 1/2."""

    count: int = Field(200, ge=2, description="m: canaries drawn (about half of them are trained on)")
    guesses: int | None = Field(None, ge=1, description="guesses each way: 'in' for the highest scores, 'out' for "
                                "the lowest, abstaining on the rest; None = count / 10 (at least 1)")
    confidence: float = Field(0.95, gt=0, lt=1, description="confidence of the epsilon lower bound")
    digits: int = Field(8, ge=1, le=12, description="digits of the random patient number slot")
    seed: int = Field(0, description="seed of the canaries' values and of which are trained on")


class CanarySpec(_Strict):
    """Repetition of chosen member records (the paper's 'canaries')."""

    repeats: int = Field(1, ge=1, description="times each canary appears in the training set (1 = data unchanged)")
    count: int = Field(1, ge=1, description="number of distinct canaries (the paper uses one per model)")
    mode: Literal["overwrite", "add"] = Field(
        "overwrite",
        description="overwrite: replace repeats-1 other members by copies (the paper's code, size unchanged); "
        "add: append repeats-1 copies",
    )
    formatted: FormattedCanarySpec | None = Field(None, description="formatted canaries for exposure; None = none")
    one_run: OneRunSpec | None = Field(None, description="canaries of the one-run privacy audit; None = none")


class FormattedCanarySpec(_Strict):
    """Formatted canaries (Carlini et al. 2019): new texts from a template with random slots, so that the space R of
    texts they could have been is known; scored apart from the members, by their exposure."""

    repeats: list[int] = Field(default_factory=lambda: [1, 4, 16], min_length=1,
                               description="copies in the training set; per_repeat canaries at each value")
    per_repeat: int = Field(2, ge=1, description="distinct canaries at each repetition count")
    digits: int = Field(6, ge=1, le=12, description="digits of the random patient number slot")
    seed: int = Field(0, description="seed of the canaries' values")

    @field_validator("repeats")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if any(r < 1 for r in v) or len(set(v)) != len(v):
            raise ValueError(f"repeats must be distinct counts >= 1, got {v}")
        return v


class DataConfig(_Strict):
    source: str = Field("synthetic", description="phee | synthetic | jsonl:PATH | csv:PATH")
    path: str | None = Field(None, description="PHEE folder; without it: $MEMLENS_PHEE_DIR, the cache, a download")
    allow_download: bool = Field(False, description="let the PHEE reader download the pinned upstream files")
    synthetic_size: int = Field(4827, ge=10, description="records of the synthetic corpus (split like PHEE)")
    members: SplitSpec = Field(default_factory=lambda: SplitSpec(split=None, n=None))
    nonmembers: SplitSpec = Field(default_factory=lambda: SplitSpec(split=None, n=None))
    canary: CanarySpec = Field(default_factory=CanarySpec)
    overlap: Literal["drop", "warn", "error"] = Field(
        "drop", description="what to do with non-members that duplicate a member (exactly or nearly)"
    )
    near_duplicate_threshold: float = Field(
        0.8, gt=0.0, le=1.0, description="Jaccard similarity of word 3-gram sets at which two texts are near-duplicates"
    )
    seed: int = Field(0, description="seed of the member/non-member draws and of the canary choice")

    @field_validator("source")
    @classmethod
    def _check_source(cls, v: str) -> str:
        kind, _, path = v.partition(":")
        if kind in ("phee", "synthetic") and not path:
            return v
        if kind in ("jsonl", "csv") and path:
            return v
        raise ValueError(f"unknown source {v!r}: expected phee, synthetic, jsonl:PATH or csv:PATH")


class LoraConfig(_Strict):
    targets: list[LogicalTarget] = Field(default_factory=lambda: ["v"], min_length=1)
    rank: int = Field(1, ge=1, description="LoRA rank r")
    alpha: float = Field(16.0, gt=0, description="LoRA alpha (used by the fixed and rslora rules)")
    alpha_rule: Literal["fixed", "proportional", "rslora"] = Field(
        "fixed", description="fixed: scale alpha/r (the paper); proportional: alpha=2r, scale 2; rslora: alpha/sqrt(r)"
    )
    dropout: float = Field(0.05, ge=0.0, lt=1.0)

    @field_validator("targets")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"targets repeat a matrix: {v}")
        return v

    @property
    def effective_alpha(self) -> float:
        return 2.0 * self.rank if self.alpha_rule == "proportional" else self.alpha

    @property
    def scaling(self) -> float:
        """The factor that multiplies B @ A in the adapted layer."""
        if self.alpha_rule == "rslora":
            return self.alpha / self.rank**0.5
        return self.effective_alpha / self.rank


class DPConfig(_Strict):
    """Differentially private fine-tuning of the adapter (DP-SGD with Opacus; see :mod:`memlens.dp`)."""

    epsilon: float | None = Field(None, gt=0, description="target epsilon; the noise multiplier is found for it")
    noise_multiplier: float | None = Field(None, gt=0, description="the noise multiplier itself, instead of a "
                                           "target epsilon (the epsilon it spends is still computed and stored)")
    delta: float = Field(1e-5, gt=0, lt=1, description="delta of the guarantee; must be below 1/N")
    max_grad_norm: float = Field(1.0, gt=0, description="per-sample gradient clipping norm C (L2, over all adapter "
                                 "weights together)")
    accountant: Literal["rdp", "prv"] = Field("rdp", description="privacy accountant (Opacus): Renyi DP or the "
                                              "privacy random variable accountant (tighter)")

    @model_validator(mode="after")
    def _one_target(self) -> DPConfig:
        if (self.epsilon is None) == (self.noise_multiplier is None):
            raise ValueError("dp: give exactly one of epsilon (a target) and noise_multiplier")
        return self


class EarlyStoppingConfig(_Strict):
    """Stop training when the mean NLL of a validation split, disjoint from every audited record, stops improving;
    the adapter of the best evaluation is kept."""

    patience: int = Field(2, ge=1, description="evaluations without improvement before training stops")
    every: int | None = Field(None, ge=1, description="evaluate every N optimizer steps; None = once an epoch")
    split: SplitSpec = Field(default_factory=lambda: SplitSpec(split="dev", n=200),
                             description="validation records: a split of the source other than the audited "
                             "ones' (dev for PHEE and the synthetic corpus), n drawn with data.seed")
    min_delta: float = Field(0.0, ge=0, description="an improvement smaller than this (nats) counts as none")


class TrainConfig(_Strict):
    method: Literal["lora", "full"] = Field("lora", description="lora, or full fine-tuning (every weight)")
    epochs: float = Field(3.0, gt=0, description="passes over the training set (ignored when max_steps is set)")
    max_steps: int | None = Field(None, ge=1, description="optimizer steps; overrides epochs")
    batch_size: int = Field(16, ge=1, description="sequences per micro-batch")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    lr: float = Field(1.0e-3, gt=0)
    warmup_steps: int = Field(20, ge=0)
    schedule: Literal["linear", "cosine", "constant"] = Field("linear", description="after warm-up")
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0, description="gradient clipping; None = off")
    seed: int = Field(0, description="seed of LoRA initialisation, dropout and batch order")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="dtype the weights are loaded in")
    precision: Precision = Field("auto", description="matrix products while training: auto = bfloat16 (autocast, "
                                 "weights and optimizer in float32) where the CPU or GPU has fast bf16, else float32")
    batching: Literal["random", "grouped"] = Field(
        "random", description="random: plain shuffled batches (the Trainer's default; packed, they cost no padding); "
        "grouped: shuffled batches of similar-length sequences (the Trainer's group_by_length: less padding when "
        "not packed, but batches of only short or only long sentences fit PHEE 0.025 nats worse after 60 steps)")
    packing: bool = Field(True, description="concatenate each batch's sequences into one row, attention kept "
                          "within each sequence (the same loss as padded batches, without the padding's compute); "
                          "checked against padding on the run's first sequences, padded where the model fails it")
    loss_average: Literal["step", "epoch"] = Field(
        "step", description="each step's loss is its summed token NLL over: step = the step's own target tokens (the "
        "Trainer's rule); epoch = the epoch's mean target tokens per step (every token weighs the same)")
    add_bos: bool = Field(True, description="prepend the BOS token (the paper's default); it is never a target")
    max_length: int | None = Field(None, ge=2, description="truncate longer sequences (tokens, BOS included)")
    too_long: Literal["truncate", "error"] = Field(
        "truncate", description="texts longer than max_length or the model's context: cut them (counted in the "
        "log) or refuse the run")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    eval_members: bool = Field(True, description="score the members' mean NLL before and after training")
    dp: DPConfig | None = Field(None, description="differentially private fine-tuning (Opacus); None = off")
    early_stopping: EarlyStoppingConfig | None = Field(None, description="stop on a validation split; None = off")


class ExtractionConfig(_Strict):
    n: int | None = Field(128, ge=1, description="members sampled for extraction (and as many non-members); "
                          "None = all; canaries are always included")
    prefix: Literal["midpoint", "fraction", "length"] = Field("midpoint", description="where the prompt ends")
    prefix_fraction: float = Field(0.5, gt=0, lt=1, description="prompt share of the tokens (prefix=fraction)")
    prefix_length: int = Field(16, ge=1, description="prompt tokens, BOS included (prefix=length)")
    greedy: bool = Field(True, description="run greedy decoding")
    temperatures: list[float] = Field(default_factory=list, description="nucleus-sampling temperatures, e.g. "
                                      "[0.1, 0.5, 1.0] (the paper's)")
    top_p: float = Field(0.9, gt=0, le=1, description="nucleus mass for sampling (Llama-2's default, as in the paper)")
    samples: int = Field(1, ge=1, description="continuations per prompt and temperature")
    batch_size: int = Field(32, ge=1, description="prompts generated together (grouped by length)")
    seed: int = Field(0)

    @field_validator("temperatures")
    @classmethod
    def _positive(cls, v: list[float]) -> list[float]:
        if any(t <= 0 for t in v):
            raise ValueError("temperatures must be > 0 (use greedy: true for deterministic decoding)")
        return v


class ReferencesConfig(_Strict):
    """Reference adapters: LoRA adapters trained with the audited run's own settings on data the audit controls."""

    count: int = Field(4, ge=2, description="number of reference adapters K (LiRA's variance needs two per group)")
    mode: Literal["offline", "online"] = Field(
        "offline", description="offline: references train on population draws only (every audited record is OUT); "
        "online: each audited record is IN for exactly half of the references (K even)")
    population: SplitSpec = Field(
        default_factory=lambda: SplitSpec(split=None, n=None),
        description="same-domain records disjoint from every audited record; split None = dev where the source has "
        "it, else the records of the members' split that the run neither trains on nor audits")
    holdout: int = Field(200, ge=2, description="population records no reference trains on: RMIA's z records "
                         "(and non-members when its parameter a is tuned)")
    tune_records: int = Field(300, ge=0, description="population training records scored under every reference "
                              "to tune RMIA's a (offline)")
    seed: int = Field(0, description="seed of the draws and of each reference's training (reference j uses seed+j)")
    lira_variance: Literal["global", "per_record"] = Field(
        "global", description="LiRA's Gaussians: one pooled variance (the paper's choice for few references) or one "
        "per record (needs at least 2 references per group)")
    rmia_gamma: float = Field(1.0, gt=0, description="RMIA's threshold on the pairwise likelihood ratio")
    rmia_a: float | None = Field(None, ge=0, le=1, description="RMIA's offline parameter a; None = tuned on the "
                                 "references (each in turn as the target), 1.0 where it cannot be")

    @model_validator(mode="after")
    def _online_even(self) -> ReferencesConfig:
        if self.mode == "online" and (self.count < 4 or self.count % 2):
            raise ValueError(f"references.count: online references need an even count >= 4, two IN and two OUT "
                             f"per record at least (got {self.count})")
        return self


class ExposureConfig(_Strict):
    candidates: int = Field(2000, ge=10, description="texts drawn from the canaries' space R to rank each canary "
                            "among (exposure resolves at most log2(candidates + 1) bits by ranking)")
    seed: int = Field(0, description="seed of the candidate draw")


class CheckpointsConfig(_Strict):
    """Checkpoints during training at which the audited records are scored: a trajectory of utility and leakage
    (see :mod:`memlens.trajectory`). Each costs one scoring pass over the audited records."""

    every: int | None = Field(None, ge=1, description="score every N optimizer steps (and at the last)")
    at: list[float] | None = Field(None, min_length=1, description="score at these fractions of training, each in "
                                   "(0, 1] (and at the last step)")
    tolerance: float = Field(0.01, ge=0, description="the threshold's utility tolerance: a later gain in held-out "
                             "mean NLL smaller than this many nats counts as none")
    signal: str = Field("ref_ratio", description="the attack whose AUC is the membership signal of the threshold")
    extraction: bool = Field(False, description="also run greedy extraction at each checkpoint, on the records "
                             "audit.extraction samples (its n): the n-gram share of members and non-members")

    @model_validator(mode="after")
    def _one_schedule(self) -> CheckpointsConfig:
        if (self.every is None) == (self.at is None):
            raise ValueError("checkpoints: give exactly one of every (optimizer steps) and at (fractions of "
                             "training)")
        if self.at is not None and any(not 0 < f <= 1 for f in self.at):
            raise ValueError(f"checkpoints.at: fractions of training must lie in (0, 1], got {self.at}")
        return self


class FieldsConfig(_Strict):
    """The games on annotated fields (see :mod:`memlens.fields`): completion and the candidate game, under the
    fine-tuned and the base model."""

    n: int | None = Field(128, ge=1, description="members sampled (and as many non-members); None = all; records "
                          "without annotations are skipped")
    types: list[str] = Field(default_factory=lambda: ["drug", "dosage", "route", "freq", "duration", "age", "gender",
                                                      "race", "population", "disorder", "effect"],
                             description="field types played")
    margin: int = Field(4, ge=0, description="tokens generated beyond the field's own length")
    candidates: int = Field(10, ge=1, description="other values of the same type in the candidate game")
    batch_size: int = Field(32, ge=1, description="prompts generated together")
    bootstrap: int = Field(1000, ge=0, description="bootstrap resamples (over records) of the differences")
    seed: int = Field(0, description="seed of the record sample, the candidate draw and the sampling")
    temperature: float | None = Field(None, gt=0, description="also sample: nucleus sampling at this temperature, "
                                      "`samples` continuations a field; recovered (sampled) when any of them starts "
                                      "with the field; None = greedy only")
    top_p: float = Field(0.9, gt=0, le=1, description="nucleus mass when sampling")
    samples: int = Field(10, ge=1, description="sampled continuations a field (with temperature)")

    @field_validator("types")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        known = ("drug", "dosage", "route", "freq", "duration", "age", "gender", "race", "population", "disorder",
                 "effect")
        bad = [t for t in v if t not in known]
        if bad or not v:
            raise ValueError(f"unknown field types {bad}: expected some of {', '.join(known)}")
        return v


class AuditConfig(_Strict):
    attacks: list[Literal["loss", "ref_ratio", "ref_diff", "zlib", "min_k", "min_k_pp", "min_k_ref",
                          "min_k_pp_ref"]] = Field(
        default_factory=lambda: ["loss", "ref_ratio", "ref_diff", "zlib", "min_k", "min_k_pp", "min_k_ref",
                                 "min_k_pp_ref"])
    min_k: float = Field(0.2, gt=0, le=1, description="Min-K% fraction used by the min_k attacks")
    ks: list[float] = Field(default_factory=lambda: [0.05, 0.1, 0.2, 0.3, 0.5],
                            description="Min-K% fractions computed and stored per sample")
    fpr: list[float] = Field(default_factory=lambda: [0.001, 0.01, 0.1], description="targets of TPR@FPR")
    bootstrap: int = Field(1000, ge=0, description="bootstrap resamples for the AUC interval (0 = off)")
    batch_size: int = Field(64, ge=1, description="sequences per scoring batch")
    precision: Precision = Field("auto", description="scoring and generation: auto = bfloat16 where the CPU or GPU "
                                 "has fast bf16, else float32 (log-softmax always in float32)")
    extraction: ExtractionConfig | None = Field(default_factory=ExtractionConfig, description="None = skip")
    include_text: bool = Field(False, description="store raw texts and generations (sensitive) in the store")
    exposure: ExposureConfig = Field(default_factory=ExposureConfig, description="exposure of formatted canaries "
                                     "(data.canary.formatted); used only when the run has them")
    blind: bool = Field(True, description="fit the blind baseline: a classifier of the texts alone, never the model")
    references: ReferencesConfig | None = Field(None, description="reference adapters and the attacks that use "
                                                "them (ref_lora, LiRA, RMIA); None = off")
    checkpoints: CheckpointsConfig | None = Field(None, description="score the audited records during training "
                                                  "(a trajectory, and its threshold); None = only after training")
    fields: FieldsConfig | None = Field(None, description="completion and candidate games on the annotated fields "
                                        "(PHEE, synthetic, annotated JSONL); None = off")

    @model_validator(mode="after")
    def _min_k_in_ks(self) -> AuditConfig:
        if self.min_k not in self.ks:
            self.ks = sorted({*self.ks, self.min_k})
        if self.checkpoints is not None and self.checkpoints.extraction and self.extraction is None:
            raise ValueError("checkpoints.extraction: needs audit.extraction (which records, how the prompt ends)")
        if self.checkpoints is not None and self.checkpoints.signal not in self.attacks:
            raise ValueError(f"checkpoints.signal: {self.checkpoints.signal!r} is not one of audit.attacks "
                             f"({', '.join(self.attacks)})")
        return self


class RunConfig(_Strict):
    """One run: model, data, adapter, training and (for memlens run) the audit."""

    model: str = Field("tiny", description="alias (smollm2-135m, gemma3-270m, tiny) | hub id | local folder")
    trust_remote_code: bool = Field(False, description="let a hub model run its own code (off unless asked)")
    allow_download: bool = Field(False, description="let a hub id be downloaded (otherwise the local cache only)")
    name: str | None = Field(None, description="run name; None = derived from the config hash")
    output_dir: str = Field("runs", description="folder that receives one sub-folder per run")
    data: DataConfig = Field(default_factory=DataConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    audit: AuditConfig = Field(default_factory=AuditConfig)
    store: str | None = Field(None, description="results store (SQLite); None = OUTPUT_DIR/memlens.sqlite")
    reuse_training: bool = Field(False, description="audit the adapter of an earlier run in OUTPUT_DIR whose training "
                                 "is this run's (memlens.reuse) instead of training again; not part of the run id")
    training_state_minutes: float = Field(10.0, ge=0, description="save a LoRA training's state into OUTPUT_DIR "
                                          "this often, so that a rerun of an interrupted run goes on from it "
                                          "(memlens.training_state); 0 = never; not part of the run id")

    @model_validator(mode="after")
    def _cross_checks(self) -> RunConfig:
        if self.reuse_training and (self.train.method != "lora" or self.train.dp is not None
                                    or self.train.early_stopping is not None or self.audit.checkpoints is not None):
            raise ValueError("reuse_training: only a plain LoRA training is reused (not train.method=full, train.dp, "
                             "train.early_stopping or audit.checkpoints, whose facts come from the training itself)")
        if self.train.dtype == "float16" and self.train.method == "full":
            raise ValueError("train.dtype=float16 with train.method=full has no loss scaling; use bfloat16 or float32")
        if self.audit.references is not None and self.train.method != "lora":
            raise ValueError("audit.references: reference adapters need train.method=lora")
        if self.train.early_stopping is not None and self.audit.checkpoints is not None:
            raise ValueError("train.early_stopping with audit.checkpoints: the adapter early stopping keeps is not the "
                             "trajectory's last point, so its threshold would describe a model that was not audited; "
                             "use one or the other")
        if self.train.dp is not None:
            t = self.train
            if t.method != "lora":
                raise ValueError("train.dp: DP fine-tuning trains an adapter; it needs train.method=lora")
            if t.precision == "bfloat16" or t.dtype != "float32":
                raise ValueError("train.dp: per-sample gradients are computed in float32; set train.precision to "
                                 "auto or float32 and train.dtype to float32")
            if t.grad_accum != 1:
                raise ValueError("train.dp: Poisson batches are split into pieces by themselves; leave "
                                 "train.grad_accum at 1")
        return self

    @field_validator("name")
    @classmethod
    def _plain_name(cls, v: str | None) -> str | None:
        """A run name names a folder inside output_dir; it is never a path (memlens may replace that folder)."""
        if v is None:
            return v
        if not v or len(v) > 200 or v.startswith(".") or any(c in v for c in ("/", "\\", "\0")) or not v.isprintable():
            raise ValueError(f"run name {v!r}: a plain name (letters, digits, - _ + . ; not starting with a dot, no "
                             "path separators), not a path: the run folder is OUTPUT_DIR/NAME")
        return v

    def resolved(self) -> dict[str, str]:
        """What ``auto`` settings become on this machine: the device and the precisions training and the audit run
        at. They change the numbers, so they enter the run id and are stored with every run."""
        from memlens.finetune import resolve_device
        from memlens.models import resolve_precision

        device = resolve_device(self.train.device)

        def effective(precision: str) -> str:  # weights loaded in half precision run in it whatever is asked
            half = self.train.dtype in ("bfloat16", "float16")
            return self.train.dtype if half else resolve_precision(precision, device)

        train = "float32" if self.train.dp is not None else effective(self.train.precision)
        return {"device": device.split(":")[0], "train_precision": train,
                "audit_precision": effective(self.audit.precision)}

    def config_hash(self) -> str:
        """sha256 of the canonical JSON of the resolved config (``auto`` settings as resolved on this machine, see
        :meth:`resolved`), without fields that do not change results."""
        return json_hash(self.hashed())

    def training_hash(self) -> str:
        """The same without the audit: runs with equal training hashes train the same adapter (memlens.reuse)."""
        d = self.hashed()
        d.pop("audit")
        d["resolved"].pop("audit_precision")
        return json_hash(d)

    def hashed(self, resolved: dict[str, str] | None = None) -> dict[str, Any]:
        """What the run id is the hash of (``resolved``: the resolution of ``auto`` settings a stored run recorded,
        instead of this machine's)."""
        d = self.model_dump(mode="json")
        d["resolved"] = self.resolved() if resolved is None else resolved
        return identity(d)


NOT_IDENTITY = ("name", "output_dir", "store", "reuse_training", "training_state_minutes")  # change no result


def identity(d: dict[str, Any]) -> dict[str, Any]:
    """A dumped run config (with its ``resolved`` settings) as the run id hashes it: without the keys that change
    no result, and without settings added later where they hold their defaults, so that a run stored by an earlier
    memlens (which lacks them) and one stored now are the same configuration. Changes ``d`` in place; a stored
    config that lacks a section is taken as it is."""
    for k in NOT_IDENTITY:
        d.pop(k, None)
    train, audit, canary = d.get("train", {}), d.get("audit", {}), d.get("data", {}).get("canary", {})
    # settings added later leave earlier run ids unchanged at their defaults
    if train.get("too_long") == "truncate":
        train.pop("too_long")
    if train.get("loss_average") == "step":
        train.pop("loss_average")
    if train.get("packing") is False:
        train.pop("packing")
    for key in ("dp", "early_stopping"):
        if train.get(key, 0) is None:
            train.pop(key)
    for key, default in (("references", None), ("blind", True), ("checkpoints", None), ("fields", None),
                         ("exposure", ExposureConfig().model_dump(mode="json"))):
        if key in audit and audit[key] == default:
            audit.pop(key)
    if audit.get("fields") and audit["fields"].get("temperature") is None:
        for key in ("temperature", "top_p", "samples"):
            audit["fields"].pop(key, None)
    for key in ("formatted", "one_run"):
        if key in canary and canary[key] is None:
            canary.pop(key)
    return d


# ---------------------------------------------------------------------------------------------- loading and overrides


def _known_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        keys.append(prefix + name)
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys.extend(_known_keys(ann, prefix + name + "."))
    return keys


def _nearest(key: str, model: type[BaseModel]) -> str:
    close = difflib.get_close_matches(key, _known_keys(model), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _format_validation_error(err: ValidationError, model: type[BaseModel], where: str) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            lines.append(f"{where}: unknown key {loc!r}{_nearest(loc, model)}")
        else:
            got = e.get("input")
            got_s = "" if isinstance(got, dict) else f" (got {got!r})"
            lines.append(f"{where}: {loc or 'config'}: {e['msg']}{got_s}")
    return "\n".join(lines)


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turn ``["a.b=1", "c=[x, y]"]`` into a nested dict; values are parsed as YAML scalars or lists."""
    out: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise MemlensError(f"override {item!r}: expected key=value, e.g. lora.rank=8")
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError as e:
            raise MemlensError(f"override {item!r}: value is not valid YAML ({e})") from None
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise MemlensError(f"override {item!r}: {p!r} is set to a value and also used as a section")
        node[parts[-1]] = value
    return out


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


class _UniqueKeyLoader(yaml.SafeLoader):
    """A safe YAML loader that refuses a key given twice in one mapping (PyYAML would keep the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                first = seen.setdefault(key, key_node.start_mark.line + 1)
            except TypeError:  # an unhashable key: let PyYAML say what is wrong with it
                continue
            if first != key_node.start_mark.line + 1:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} given twice (first at line {first})", key_node.start_mark)
        return super().construct_mapping(node, deep)


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise MemlensError(f"{path}: config file not found")
    try:
        raw = yaml.load(path.read_text(encoding="utf-8-sig"), Loader=_UniqueKeyLoader)
    except UnicodeDecodeError as e:
        raise MemlensError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise MemlensError(f"{path}: cannot read ({e.strerror})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise MemlensError(f"{where}: invalid YAML: {getattr(e, 'problem', e)}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise MemlensError(f"{path}: expected a mapping of keys at the top level, got {type(raw).__name__}")
    return raw


def validate(raw: dict[str, Any], model: type[BaseModel] = RunConfig, where: str = "config") -> Any:
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        raise MemlensError(_format_validation_error(e, model, where)) from None


def load_config(path: str | Path | None, overrides: list[str] | None = None, model: type[BaseModel] = RunConfig):
    """Read a YAML config (or start from the defaults), apply ``key=value`` overrides and validate it."""
    raw = read_yaml(path) if path is not None else {}
    if overrides:
        raw = deep_merge(raw, parse_overrides(overrides))
    return validate(raw, model, where=str(path) if path is not None else "config")


def dump_yaml(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
