"""Typed configuration: one pydantic model per stage, composed into `PipelineConfig`.

The same models are the Prefect flow's parameters (the UI renders them as a form) and the
arguments of every `run(cfg)`-style entry point, so there is one config system.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

DEFAULT_DATAVERSE_URL = "https://dataverse.harvard.edu"
DATAVERSE_URL_ENV = "SKINSENSE_DATAVERSE_URL"
HAM10000_DOI = "doi:10.7910/DVN/DBW86T"
DEFAULT_ARCHS = ("efficientnet_b0", "efficientnet_b3", "maxvit_t")


def skinsense_home() -> Path:
    """The root of everything a run keeps: `$SKINSENSE_HOME`, else `./skinsense_home`."""
    return Path(os.environ.get("SKINSENSE_HOME", "skinsense_home")).expanduser().resolve()


class _Strict(BaseModel):
    # Unknown keys are a typo in a form or a CLI flag, never something to ignore silently.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class NearDuplicateConfig(_Strict):
    """The validate stage's near-duplicate check across lesion_ids (see
    `skinsense.data.duplicates`). Every setting is part of the data fingerprint."""

    enabled: bool = Field(
        True, description="Look for near-duplicate images filed under different lesion_ids "
        "and keep the lesions they link in one part of the split.")
    # Measured on 200 synthetic copies (half of them mirrored or quarter-turned, then rotated
    # 0.5-5 degrees, re-encoded, resized 0.6-1.5x, cropped 1-3%, colour-shifted 8%;
    # synth_copies.COPY_BOUNDS): at most 12 of 64 bits apart under the best of the 8
    # mirror/turn variants. With 8 variants a looser bound lets most pairs of synthetic
    # lesions through (half of them are within 20 bits) and the search costs 3x more.
    max_hamming: int = Field(
        14, ge=0, le=32, description="Largest perceptual-hash (pHash, 64 bits) distance of a "
        "candidate pair.")
    # The second opinion: cosine of the colour thumbnails (16x16, each channel standardised,
    # so a colour shift cancels) under the same variant (near misses also turned by up to 5
    # degrees). Those copies score >= 0.97; distinct synthetic lesions of one patient (same
    # sex, site and age) reach 0.967 (1 pair of 499,500; 2026-12-04).
    min_similarity: float = Field(
        0.96, gt=0, le=1, description="Smallest thumbnail similarity that confirms a pair.")
    # Re-encoded or resized copies score >= 0.985 (no geometric or colour change); a
    # pair of different sex, body site or age (5+ years apart) must be that close.
    min_similarity_other_patient: float = Field(
        0.985, gt=0, le=1, description="Smallest similarity that confirms a pair whose known "
        "sex, body site or age differ.")
    # A rotated or slightly cropped copy differs most at the frame's edges (black corners,
    # lost rim); both signatures look at the central part only.
    central_fraction: float = Field(
        0.9, gt=0.5, le=1, description="Share of each side the signatures look at (centred).")


class DataConfig(_Strict):
    """Where HAM10000 comes from and how it is split, oversampled and cached."""

    source: str = Field(
        "dataverse",
        description="'dataverse' to download from Harvard Dataverse, or a path to a folder or "
        "zip laid out like the Dataverse files or the Kaggle copy.",
    )
    # A plain default, so the Prefect UI's form shows it; $SKINSENSE_DATAVERSE_URL replaces it
    # when the field is not given (see `_dataverse_url_from_env`).
    dataverse_url: str = Field(
        DEFAULT_DATAVERSE_URL,
        description="Base URL of the Dataverse installation (when not given: "
        "env SKINSENSE_DATAVERSE_URL, else this).",
    )
    doi: str = Field(HAM10000_DOI, description="Persistent id of the HAM10000 dataset.")
    include_isic_test: bool = Field(
        False, description="Also fetch the official ISIC 2018 Task 3 test images and labels."
    )
    isic_test_as_test: bool = Field(
        False,
        description="Use the official ISIC 2018 Task 3 test set as the test part "
        "(HAM10000 is then split into train and val only).",
    )
    split_seed: int = Field(42, description="Seed of the lesion-level split.")
    val_fraction: float = Field(0.15, gt=0, lt=0.5, description="Share of lesions for validation.")
    test_fraction: float = Field(0.15, gt=0, lt=0.5, description="Share of lesions held out for test.")
    train_fraction: float = Field(
        1.0,
        gt=0,
        le=1,
        description="Keep this fraction of each class of the training part (quick experiments).",
    )
    # 1% tolerates the odd unreadable file of a real download; more means a broken source.
    max_bad_fraction: float = Field(
        0.01, ge=0, le=1, description="Fail when more than this fraction of images is unreadable."
    )
    oversample: bool = Field(True, description="Oversample minority classes of the training part.")
    oversample_target: int | None = Field(
        None,
        ge=1,
        description="Images per class after oversampling; empty means the largest class's count.",
    )
    # Three copies keep the model from memorising a few rare lesions (df has 115 images).
    max_copies_per_image: int = Field(
        3, ge=0, le=20, description="At most this many augmented copies of one training image."
    )
    color_jitter: bool = Field(False, description="Add colour jitter to oversampled copies.")
    class_weights: bool = Field(True, description="Weight the loss by inverse class frequency.")
    cache_workers: int | None = Field(
        None, ge=1, description="Worker processes for the image cache; empty means all cores."
    )
    refresh: bool = Field(
        False, description="Re-verify downloads (MD5) and extract the images again."
    )
    # A plain default (pydantic copies it per instance), so the Prefect UI's form shows it.
    near_duplicates: NearDuplicateConfig = Field(
        NearDuplicateConfig(),
        description="Near-duplicate images across lesion_ids, grouped before the split.",
    )
    extra_sources: list[Literal["feedback"]] = Field(
        [], description="Data sources added to the training part only, never to validation "
        "or test: 'feedback' is the confirmed diagnoses with kept images "
        "(docs/OPERATIONS.md, After deployment).")

    @model_validator(mode="before")
    @classmethod
    def _dataverse_url_from_env(cls, data: object) -> object:
        if isinstance(data, dict) and "dataverse_url" not in data:
            url = os.environ.get(DATAVERSE_URL_ENV)
            if url:
                return {**data, "dataverse_url": url}
        return data

    @model_validator(mode="after")
    def _fractions_leave_training_data(self) -> DataConfig:
        if self.val_fraction + self.test_fraction >= 0.8:
            raise ValueError("val_fraction + test_fraction must leave at least 20% for training")
        if self.isic_test_as_test and not self.include_isic_test:
            self.include_isic_test = True
        return self


class TrainConfig(_Strict):
    """How each architecture is fine-tuned."""

    # A plain default (pydantic copies it for each instance): the Prefect UI's form shows
    # only defaults written into the schema, and a default_factory is not.
    archs: list[str] = Field(
        list(DEFAULT_ARCHS),
        min_length=1,
        description="torchvision architectures to train, e.g. efficientnet_b0, maxvit_t.",
    )
    image_size: int | None = Field(
        None,
        ge=16,
        le=1024,
        description="Input size for every architecture; empty means each one's default.",
    )
    epochs: int = Field(10, ge=1, le=500, description="Most epochs per architecture.")
    batch_size: int = Field(64, ge=1, le=4096, description="Images per optimizer step (per GPU).")
    lr: float = Field(3e-4, gt=0, lt=1, description="Peak AdamW learning rate.")
    # AdamW with decoupled weight decay; 0.05 is the usual fine-tuning value for these nets.
    weight_decay: float = Field(0.05, ge=0, lt=1, description="AdamW weight decay.")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="Label smoothing of the loss.")
    early_stopping_patience: int = Field(
        5, ge=1, description="Stop after this many epochs without a better val balanced accuracy."
    )
    pretrained: bool = Field(
        True, description="Start from ImageNet weights (needs them cached or downloadable)."
    )
    weights_path: str | None = Field(None, description="Local file of pretrained weights.")
    seed: int = Field(0, description="Seed of initialization, shuffling and augmentation.")
    # 1.0 is the usual safety net for fine-tuning with AdamW: it only bites on the rare
    # exploding step (a fresh head on pretrained features), not on ordinary ones.
    grad_clip_norm: float | None = Field(
        1.0, gt=0, description="Clip the gradients' global L2 norm to this; empty: no clipping."
    )
    grad_accum_steps: int = Field(
        1, ge=1, le=256,
        description="Optimizer step every this many batches (effective batch = batch_size x this).",
    )
    # Half an epoch lets AdamW's moment estimates settle before the full learning rate hits
    # the pretrained weights; the cosine decay takes the rest.
    warmup_epochs: float = Field(
        0.5, ge=0, description="Linear learning-rate warm-up, in epochs (fractions allowed)."
    )
    precision: Literal["auto", "bf16-mixed", "16-mixed", "32-true"] = Field(
        "auto", description="'auto': bf16-mixed on CUDA, 32-true elsewhere (bf16 on CPU is slow)."
    )
    channels_last: bool = Field(
        True, description="Model and batches in channels_last memory (faster convolutions on GPUs)."
    )
    cudnn_benchmark: bool = Field(
        True,
        description="On CUDA, let cuDNN time its convolution algorithms for the (fixed) batch "
        "shape and keep the fastest; off gives cuDNN's defaults (slower, more repeatable).",
    )
    compile: bool = Field(
        False,
        description="torch.compile the model. With accelerator 'auto' it is skipped (and said so) "
        "when training lands on the CPU; accelerator 'cpu' compiles on the CPU too.",
    )
    loader: Literal["batched", "dataloader"] = Field(
        "batched",
        description="'batched' reads whole batches from the cache in one call (fast); "
        "'dataloader' uses a torch DataLoader with num_workers worker processes.",
    )
    num_workers: int = Field(
        2, ge=0, le=64, description="DataLoader worker processes (loader 'dataloader' only)."
    )
    progress: bool = Field(True, description="Show a progress bar per epoch (terminals only).")
    accelerator: Literal["auto", "cpu", "cuda", "gpu", "mps"] = "auto"

    @property
    def may_use_cuda(self) -> bool:
        """The accelerator lets training run on CUDA GPUs (when the machine has them)."""
        return self.accelerator in ("auto", "cuda", "gpu")
    parallel_archs: bool = Field(
        False,
        description="Train the architectures at the same time, each holding one slot of the "
        "Prefect global concurrency limit 'gpu' (one slot per GPU); default one after another.",
    )
    devices: int = Field(
        1, ge=1, description="GPUs to train on (per node); more than 1 trains with DDP in child "
        "processes."
    )
    num_nodes: int = Field(
        1, ge=1, le=64,
        description="Machines that train one model together (DDP over torchrun's c10d "
        "rendezvous at rdzv_endpoint, devices GPUs each); the others join with `skinsense "
        "train-node` (docs/OPERATIONS.md). SKINSENSE_HOME must be shared by all of them.",
    )
    rdzv_endpoint: str | None = Field(
        None,
        description="HOST:PORT of torchrun's c10d rendezvous when num_nodes > 1: an address of "
        "one of the nodes (usually the one the flow runs on) that every node can reach.",
    )
    # Ten minutes is torchrun's default; the other nodes are started by hand, so give more.
    rdzv_timeout_s: int = Field(
        1800, ge=10,
        description="How long the nodes of a multi-node training wait for each other at the "
        "rendezvous before giving up.",
    )
    fan_out: bool = Field(
        False,
        description="Train each architecture in a child flow run of the deployment "
        "'train-architecture/train-architecture' on the work pool 'skinsense-gpu', so workers "
        "on several machines train them at the same time (parallel_archs does not apply). "
        "Needs SKINSENSE_HOME on storage every worker mounts, and the Prefect and MLflow "
        "servers (docs/OPERATIONS.md).",
    )
    job_variables: dict[str, dict[str, Any]] = Field(
        {},
        description="With fan_out: work-pool job variables of each architecture's child run, "
        "by architecture name ('*' for all), e.g. {'maxvit_t': {'gpu': 2}} on a Kubernetes "
        "pool or {'*': {'env': {'OMP_NUM_THREADS': '4'}}} on a process pool.",
    )

    @field_validator("archs")
    @classmethod
    def _known_archs(cls, archs: list[str]) -> list[str]:
        from skinsense.models import available_archs

        known = set(available_archs())
        unknown = [a for a in archs if a not in known]
        if unknown:
            raise ValueError(
                f"unknown architecture(s) {unknown}; choose torchvision classification models "
                f"such as {', '.join(DEFAULT_ARCHS)}"
            )
        if len(set(archs)) != len(archs):
            raise ValueError(f"architectures listed twice: {archs}")
        return archs

    @model_validator(mode="after")
    def _sizes_fit_the_archs(self) -> TrainConfig:
        from skinsense.models import check_image_size, default_image_size

        for arch in self.archs:
            check_image_size(arch, self.image_size or default_image_size(arch))
        return self

    @model_validator(mode="after")
    def _nodes_can_meet(self) -> TrainConfig:
        if self.num_nodes > 1:
            host, _, port = (self.rdzv_endpoint or "").rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(
                    f"num_nodes={self.num_nodes} needs rdzv_endpoint as HOST:PORT (an address "
                    f"of one of the nodes that all of them reach, e.g. gpu-1.lan:29400); got "
                    f"{self.rdzv_endpoint!r}")
            if len(self.archs) > 1 and (self.parallel_archs or self.fan_out):
                # Trainings at the same time would all meet at the one rendezvous address.
                raise ValueError(
                    f"num_nodes={self.num_nodes} trains one architecture at a time over the "
                    f"rendezvous at {self.rdzv_endpoint}; turn off "
                    f"{'fan_out' if self.fan_out else 'parallel_archs'} or train "
                    f"{len(self.archs)} architectures in separate runs")
        unknown = set(self.job_variables) - set(self.archs) - {"*"}
        if unknown:
            raise ValueError(f"job_variables names architecture(s) {sorted(unknown)} that are "
                             f"not in archs {self.archs}; use those names or '*'")
        return self

    @property
    def world_size(self) -> int:
        """Training processes in all: devices per node times nodes."""
        return self.devices * self.num_nodes

    def run_key(self) -> dict[str, Any]:
        """The settings that decide what training produces (the key of its run folder).

        Where and how it is scheduled (fan_out, job_variables, the rendezvous address and
        timeout) changes nothing in the weights, so a training is reused across those. A
        single node is left out of the key so that run folders made before multi-node
        training existed are still found.
        """
        key = self.model_dump(mode="json", exclude={"fan_out", "job_variables", "num_nodes",
                                                    "rdzv_endpoint", "rdzv_timeout_s"})
        if self.num_nodes != 1:
            key["num_nodes"] = self.num_nodes
        return key


class EvalConfig(_Strict):
    """How candidates are compared and promoted."""

    metric: Literal["balanced_accuracy", "accuracy", "macro_f1"] = "balanced_accuracy"
    min_delta: float = Field(
        0.0, ge=0, description="Promote only when better than the champion by more than this."
    )
    batch_size: int = Field(64, ge=1, description="Images per batch at evaluation.")
    tta: bool = Field(False, description="Average the test part's predictions over flips for "
                      "the headline metrics; the app predicts without flips, so calibration, "
                      "referral, gate and subgroup figures come from a plain pass.")
    measure_efficiency: bool = Field(
        True, description="Measure parameters, file size and CPU latency of each candidate."
    )
    # 95% matches what triage products report (SkinVision: 91-96% at 89% specificity); a
    # missed melanoma costs far more than an extra visit to a dermatologist.
    referral_sensitivity: float = Field(
        0.95, gt=0, le=1,
        description="Share of malignant (mel, bcc, akiec) validation images the referral rule "
        "must send to a dermatologist; the highest threshold that does so is chosen.",
    )
    # With 1,000 resamples the Monte Carlo error of a 2.5% percentile is under a tenth of
    # the figure's own standard error; the whole audit takes about a second.
    bootstrap_resamples: int = Field(
        1000, ge=100, le=100_000,
        description="Bootstrap resamples (of whole lesions) behind every 95% interval.",
    )
    bootstrap_seed: int = Field(0, description="Seed of the bootstrap, so intervals repeat.")
    # 95 is the operating point the out-of-domain literature reports (FPR at 95% TPR): one
    # real lesion in twenty is turned away, the price of refusing photos, pets and screenshots.
    ood_percentile: float = Field(
        95.0, gt=50, le=100,
        description="The out-of-domain gate's threshold is this percentile of the validation "
        "part's gate scores: about (100 - this)% of real dermatoscopic images are refused.",
    )
    # A few hundred images fix the activation ranges well (ONNX Runtime's examples use
    # 100-500); more only costs calibration time.
    int8: bool = Field(True, description="Quantize each candidate to int8 (model.int8.onnx, "
                       "calibrated on the validation part) and compare it with fp32 on the "
                       "test part; the app serves int8 only when the comparison allows it.")
    int8_calibration_images: int = Field(
        300, ge=1, description="Validation images that calibrate the int8 activation ranges.")
    int8_min_speedup: float = Field(
        1.1, ge=0, description="int8 is served only when at least this many times faster than "
        "fp32 on the evaluating machine's CPU (0: speed is no condition).")
    # Like a subgroup: below ~30 cases an accuracy's interval is wider than any difference
    # worth acting on.
    field_min_cases: int = Field(
        30, ge=1,
        description="field_* metrics (on confirmed diagnoses the model never trained on, "
        "with lesion-bootstrap intervals) need at least this many such cases.")
    subgroup_min_images: int = Field(
        30, ge=1,
        description="A subgroup figure needs at least this many test images (for referral "
        "sensitivity: malignant images); smaller groups are listed with their count only.",
    )


class ServeConfig(_Strict):
    """The app the last step deploys."""

    deploy: bool = Field(True, description="Start or refresh the app when the run ends.")
    model_name: str = Field("skinsense", min_length=1, description="Registered model name.")
    host: str = Field("127.0.0.1", description="Interface to bind; loopback unless asked.")
    port: int = Field(7860, ge=1, le=65535, description="Port of the app.")
    # Cold start of torch + gradio takes ~20 s on 2 cores; leave room for a slow machine.
    startup_timeout_s: float = Field(
        180.0, gt=0, description="How long a starting app may take to answer."
    )
    # A retrain takes hours, so a minute's delay before a new champion is served costs
    # nothing; the deploy step does not wait for it (it asks the app to reload at once).
    reload_interval_s: float = Field(
        60.0, ge=0, description="How often the app checks the registry alias for a new "
        "champion; 0 turns the watcher off (POST /reload still works).")
    # A dermatoscope JPEG is 0.2-3 MB; the cap keeps a hostile upload off the disk and RAM.
    max_file_size_mb: float = Field(10.0, gt=0, description="Largest upload the app accepts.")
    # One request alone uses every core; concurrent ones get a core each (ONNX Runtime's
    # sessions in skinsense.serving.runtime), so one request per core keeps every core busy
    # without oversubscribing them. None: from the cores this process may use.
    concurrency_limit: int | None = Field(
        None, ge=1, description="Classify requests run at once; empty: one per CPU core.")
    model_threads: int | None = Field(
        None, ge=1, description="ONNX Runtime threads of a request that runs alone (concurrent "
        "ones share them out); empty: every CPU core.")
    # int8 only where the evaluation measured it as good as fp32 and faster (skinsense.quantize).
    precision: Literal["auto", "int8", "fp32"] = Field(
        "auto", description="auto: int8 (model.int8.onnx) when the model card's int8 "
        "comparison allows it, else fp32; int8 or fp32 force one.")
    # Off only to measure what the gate costs (bench/serve_latency.py) or for a trusted
    # pipeline of dermatoscope images; /health then says "off".
    gate: bool = Field(
        True, description="Check image quality and the out-of-domain gate before answering; "
        "off classifies every image, as before the gate existed.")
    # The log is what monitoring reads (skinsense-monitor); off only to measure its cost.
    log_predictions: bool = Field(
        True, description="Append every answer (refusals too) to the prediction log "
        "(SKINSENSE_LOG_DATABASE_URL, else SQLite under SKINSENSE_HOME/monitoring).")
    # Uploads are health data: nothing is kept unless the operator decides to.
    keep_images: bool = Field(
        False, description="Keep each answered upload (SKINSENSE_HOME/monitoring/images), "
        "so confirmed diagnoses can become training data.")
    keep_images_days: int = Field(
        30, ge=1, le=3650, description="Delete kept uploads after this many days.")
    feedback: bool = Field(
        True, description="Show the form for confirmed diagnoses; it needs a login whenever "
        "the app listens beyond loopback (SKINSENSE_FEEDBACK_AUTH or the stack's login).")


class MonitorConfig(_Strict):
    """What the `skinsense-monitor` flow compares, and when it calls it drift.

    Each threshold says when one test "crosses": the flow then emits
    `skinsense.drift.detected` with every test that crossed and its figures.
    """

    model_name: str = Field("skinsense", min_length=1, description="Registered model name.")
    window_hours: float = Field(
        24.0, gt=0, le=24 * 366, description="The log window compared: the last this many "
        "hours (the daily schedule looks at the day since the last run).")
    # Below ~50 answers a chi-square on 7 classes and a KS test say little either way.
    min_requests: int = Field(
        50, ge=1, description="A window with fewer requests is reported as too small to test.")
    # 1% per test: with five tests a day, a false alarm about every three weeks.
    p_value: float = Field(
        0.01, gt=0, lt=1, description="Significance level of the chi-square (class mix) and "
        "Kolmogorov-Smirnov (ood_score) tests.")
    # 0.2 is the usual "significant shift" of the population stability index in credit
    # scoring, where PSI comes from; 0.1-0.2 is "some shift".
    psi_threshold: float = Field(
        0.2, gt=0, description="The class mix drifts when its PSI against the test part "
        "exceeds this (as well as the chi-square test's p-value being below p_value).")
    # The gate refuses ~5% of real test images by design (eval.ood_percentile 95).
    ood_rate_increase: float = Field(
        0.10, gt=0, le=1, description="Out-of-domain refusals drift when their rate is this "
        "much (absolute) above the test part's.")
    quality_rate_max: float = Field(
        0.20, gt=0, le=1, description="Quality refusals drift when more than this share of "
        "requests is refused for quality.")
    referral_rate_change: float = Field(
        0.10, gt=0, le=1, description="The referral rate drifts when the test part's rate is "
        "outside its 95% interval and differs by more than this (absolute).")
    min_confirmed: int = Field(
        20, ge=1, description="Accuracy and referral sensitivity on confirmed cases are "
        "tested only with at least this many confirmed cases in the window.")
    retrain_min_feedback: int = Field(
        20, ge=1, description="Emit skinsense.feedback.ready when at least this many "
        "confirmed cases have arrived since the champion was trained.")
    experiment: str = Field("skinsense-monitoring", min_length=1,
                            description="MLflow experiment of the monitoring runs.")


class PipelineConfig(_Strict):
    """Everything the `skinsense-pipeline` flow needs; Prefect renders it as a form."""

    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    experiment: str = Field("skinsense", min_length=1, description="MLflow experiment name.")
