"""Configuration: OmegaConf structured configs, YAML presets and command-line overrides.

    freezebench train policy=static policy.fraction=0.5 trainer.epochs=3 optim.lr=0.05
    freezebench train --config configs/digits_resnet20.yaml model.name=tiny

Resolution order: the dataclass defaults below, then the preset YAML (``--config``), then the command
line (``key=value`` in OmegaConf dot-list syntax). ``policy=<name>`` selects that policy's own config
group: the dataclass ``Config`` of the registered policy class, so ``policy.<knob>`` keys are validated
against the chosen policy. Unknown keys and wrong types raise :class:`ConfigError` naming the key and
suggesting the nearest known one.
"""

from __future__ import annotations

from collections.abc import Sequence
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf import errors as oc_errors

from .errors import ConfigError, did_you_mean
from .policy import PolicyConfig
from .ranges import Range, check_ranges

REPO_CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@dataclass
class ModelConfig:
    name: str = "resnet20"  # zoo name: see `freezebench list` (resnet20/32/56, resnet18/50, vgg11_bn, ...)
    pretrained: bool = False  # load torchvision's ImageNet weights (needs them cached locally or internet)
    checkpoint: str | None = None  # start from these weights (a freezebench checkpoint or a state dict)
    granularity: str = "auto"  # units to freeze: layer | block | auto (the policy's own preference)
    reinit_head: bool = False  # with checkpoint: keep a new classifier head (the last nn.Linear), load the rest (fine-tuning on other classes); hf: allow a checkpoint head of another label count (it is re-initialised)
    hf_path: str | None = None  # model.name=hf: a local model folder (save_pretrained) or a name in the local Hugging Face cache, read offline


@dataclass
class SieveConfig:
    enabled: bool = False  # data sieving (SpFDE): train on a partial set that rotates by training loss
    ratio: float = 0.8  # partial set size as a fraction of the training set, in (0, 1]
    period: int = 1  # sieving period in epochs: the partial set is updated every `period` epochs
    swap: float = 1.0  # share of the removed set brought back (and of easiest partial samples removed) per period, (0, 1]


@dataclass
class DataConfig:
    name: str = "digits"  # digits (embedded default) | cifar10 | cifar100 | imagefolder | synthetic | text_demo | glue (text: the nlp extra)
    root: str = "./data"  # folder holding CIFAR / ImageFolder data
    download: bool = False  # download CIFAR into root when absent (needs the internet)
    batch_size: int = 32  # training batch size (the SmartFRZ paper uses 32)
    eval_batch_size: int = 512  # evaluation batch size
    augment: bool = True  # standard augmentation (random crop + flip) for CIFAR/imagefolder; digits: none
    val_fraction: float = 0.2  # digits/synthetic: held-out fraction (stratified, split_seed)
    split_seed: int = 0  # seed of the train/val split (fixed across runs so runs are comparable)
    train_subset: int | None = None  # use only the first N training samples (quick experiments)
    image_size: int | None = None  # resize inputs to this side in pixels, on the device (CIFAR/digits/synthetic; the paper suites: 224); imagefolder default 224; null: native
    classes: list[int] | None = None  # keep only these classes (dataset label indices), relabelled 0..k-1 in this order; null: all
    num_workers: int = 0  # DataLoader workers (imagefolder only; tensor datasets need none)
    synthetic_samples: int = 512  # synthetic: number of samples (train + val)
    synthetic_classes: int = 4  # synthetic: number of classes
    synthetic_size: int = 8  # synthetic: image side in pixels
    synthetic_channels: int = 3  # synthetic: image channels
    task: str | None = None  # glue: mrpc | cola | sst2 | rte | qnli | qqp | mnli
    tokenizer: str | None = "${model.hf_path}"  # glue: folder (or local cache name) of the tokenizer; default the model's (model.hf_path)
    max_length: int = 128  # text: truncate sequences to this many tokens (batches are padded to their longest)
    bucket_batches: int = 50  # text: length bucketing, each run of this many batches sorted by length (0 or 1: off)
    text_samples: int = 2000  # text_demo: number of sequences (train + val)
    sieve: SieveConfig = field(default_factory=SieveConfig)  # data sieving: the `data.sieve.*` keys below


@dataclass
class OptimConfig:
    name: str = "sgd"  # sgd (with momentum, as the SmartFRZ paper) | adamw
    lr: float = 0.05  # base learning rate (peak, after warm-up)
    momentum: float = 0.9  # sgd momentum
    nesterov: bool = False  # sgd: Nesterov momentum
    weight_decay: float = 5e-4  # L2 (sgd) or decoupled (adamw) weight decay
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # adamw betas


@dataclass
class ScheduleConfig:
    name: str = "cosine"  # cosine (annealed per step to min_lr_factor) | constant | step | linear (decays linearly to min_lr_factor: the BERT recipe, with optim.name=adamw and warmup_fraction=0.1)
    warmup_epochs: float = 0.0  # linear warm-up length in epochs (fractions allowed)
    warmup_fraction: float = 0.0  # linear warm-up length as a fraction of all training steps (BERT: 0.1); used when warmup_epochs is 0
    min_lr_factor: float = 0.0  # cosine: final lr as a fraction of optim.lr
    milestones: list[float] = field(default_factory=list)  # step: epochs at which lr is multiplied by gamma
    gamma: float = 0.1  # step: multiplicative decay at each milestone


@dataclass
class SparsityConfig:
    enabled: bool = False  # sparse training: unstructured weight masks on conv / linear weights
    sparsity: float = 0.8  # target fraction of masked (zero) weights over the masked layers, in [0, 1)
    distribution: str = "erk"  # per-layer densities: uniform | erk (Erdos-Renyi-Kernel, Evci et al. 2020)
    mask_every: int = 100  # prune-by-magnitude and regrow every N optimiser steps (0: fixed random mask)
    update_fraction: float = 0.1  # share of each layer's kept weights pruned and regrown at a mask update
    update_until: float = 0.75  # no mask updates after this fraction of training (masks then fixed)
    dense_head: bool = True  # keep the classifier head dense (common sparse-training practice)
    seed: int | None = None  # seed of the random masks and regrowth (default: trainer.seed)


@dataclass
class TrainerConfig:
    epochs: int = 10  # training epochs
    device: str = "auto"  # auto (cuda when available) | cpu | cuda | cuda:N
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast; fp16 uses a gradient scaler, CUDA only)
    channels_last: bool = False  # CUDA: channels_last memory format for conv nets
    seed: int = 0  # seeds Python, NumPy and torch (and the data order)
    deterministic: bool = True  # deterministic kernels (bit-reproducible on CPU)
    allow_inexact_resume: bool = False  # resume a checkpoint of other threads/device/torch under deterministic=true
    probe_batch_size: int = 64  # size of the fixed, seeded probe batch for activation signals
    max_steps_per_epoch: int | None = None  # cap the steps per epoch (quick runs, benchmarks)
    eval_every: int = 1  # evaluate every N epochs (the last epoch is always evaluated)
    progress: bool = True  # progress bar while training
    check_finite_every: int = 25  # check the loss for NaN/inf every N steps (each check syncs the device)
    output_dir: str = "outputs"  # local folder for checkpoints and run files
    save_checkpoint: bool = True  # write the final weights to <output_dir>/<run id or name>/final.pt
    checkpoint_every: int = 1  # write the full training state to <output_dir>/<run>/last.pt every N epochs (resume); 0: never
    cache_frozen_prefix: bool = False  # store the frozen prefix's outputs per sample and skip its forward (no random augmentation)
    cache_dtype: str = "bf16"  # precision of the stored prefix outputs: bf16 | fp16 | fp32 (fp32: training identical to no cache)
    cache_location: str = "device"  # where they are kept: device (its memory) | cpu (host memory, prefetched) | disk (memory-mapped)
    cache_dir: str | None = None  # cache_location=disk: folder for the memory-mapped files (default: a temporary folder)
    compile: bool = False  # torch.compile the training forward, one graph per frozen set (freezebench.features.compile)
    compile_backend: str = "inductor"  # torch.compile backend: inductor | aot_eager | eager (dynamo only) | ...
    compile_mode: str = "default"  # inductor mode: default | reduce-overhead | max-autotune | max-autotune-no-cudagraphs
    grad_norm_metric: bool = False  # log train/grad_norm: the mean L2 norm of each step's gradients over the epoch


@dataclass
class TrackingConfig:
    enabled: bool = True  # log the run to MLflow (false: library use, nothing written)
    uri: str | None = None  # tracking URI; default $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db
    experiment: str = "freezebench"  # MLflow experiment name
    run_name: str | None = None  # default: <policy>-<model>-<dataset>-s<seed>
    log_checkpoint: bool = True  # log the final weights as an artifact (the CKA oracle reads them)
    system_metrics: bool = True  # MLflow system metrics (CPU, memory, GPU) sampled in the background
    tags: dict[str, str] = field(default_factory=dict)  # extra tags for the run (tracking.tags.suite=table2)
    parent_run_id: str | None = None  # nest the run under this MLflow run (sweeps: one child per trial)
    run_id: str | None = None  # continue this existing MLflow run instead of starting one (resume)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    sparsity: SparsityConfig = field(default_factory=SparsityConfig)
    policy: Any = field(default_factory=PolicyConfig)  # the chosen policy's own Config dataclass
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    resume: str | None = None  # continue training from a last.pt checkpoint path, or auto: the newest unfinished one of this config under trainer.output_dir (none: start afresh)


CHOICES: dict[str, tuple[str, ...]] = {
    "model.granularity": ("auto", "layer", "block"),
    "optim.name": ("sgd", "adamw"),
    "schedule.name": ("cosine", "constant", "step", "linear"),
    "trainer.precision": ("fp32", "bf16", "fp16"),
    "trainer.cache_dtype": ("bf16", "fp16", "fp32"),
    "trainer.cache_location": ("device", "cpu", "disk"),
    "trainer.compile_mode": ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
    "sparsity.distribution": ("uniform", "erk"),
}


def _policy_class(name: str) -> type:
    from .registry import POLICIES

    return POLICIES.get(name)


def _policy_node(name: str) -> DictConfig:
    cls = _policy_class(name)
    node = OmegaConf.structured(cls.Config(name=name))
    return node


def _all_keys(node: Any, prefix: str = "") -> list[str]:
    keys = []
    if isinstance(node, DictConfig):
        for k in node.keys():
            full = f"{prefix}{k}"
            keys.append(full)
            child = node._get_node(k)
            if isinstance(child, DictConfig):
                keys.extend(_all_keys(child, full + "."))
    return keys


def _parse_overrides(overrides: list[str]) -> list[str]:
    out = []
    for o in overrides:
        o = o.strip()
        if not o:
            continue
        if "=" not in o:
            raise ConfigError(f"override {o!r} is not of the form key=value (e.g. trainer.epochs=3)")
        key = o.split("=", 1)[0].strip()
        if not key:
            raise ConfigError(f"override {o!r} has an empty key")
        out.append(o)
    return out


def split_overrides(items: Sequence[str]) -> list[str]:
    """Command-line overrides as ``key=value`` items. An item may hold several, as one string
    (``mlflow run -P overrides="a=1 b=2"``, a shell variable): such items are split on shell rules."""
    import shlex

    out: list[str] = []
    for item in items:
        try:
            out.extend(shlex.split(item) if (" " in item.strip() or not item.strip()) else [item])
        except ValueError as e:  # unbalanced quotes
            raise ConfigError(f"cannot split the overrides {item!r} into key=value items: {e}") from None
    return out


def _find_preset(path: str) -> Path:
    p = Path(path)
    candidates = [p, REPO_CONFIGS / p, REPO_CONFIGS / f"{path}.yaml"]
    for c in candidates:
        if c.is_file():
            return c
    known = sorted(x.stem for x in REPO_CONFIGS.glob("*.yaml")) if REPO_CONFIGS.is_dir() else []
    raise ConfigError(f"config preset {path!r} not found.{did_you_mean(path, known)} Presets: {', '.join(known)}")


def _oc_message(e: Exception, base: DictConfig) -> str:
    key = getattr(e, "full_key", None) or ""
    msg = getattr(e, "msg", None) or str(e).splitlines()[0]
    if isinstance(e, oc_errors.ConfigKeyError) or "not in struct" in str(e) or "Key '" in str(e):
        return f"unknown config key {key!r}.{did_you_mean(key, _all_keys(base))}"
    first = msg.splitlines()[0]
    return f"invalid value for {key!r}: {first}" if key else first


def load_config(overrides: list[str] | None = None, preset: str | None = None) -> DictConfig:
    """Build and validate the run configuration. Raises :class:`ConfigError` on bad input."""
    overrides = _parse_overrides(list(overrides or []))
    preset_cfg: DictConfig | None = None
    if preset:
        path = _find_preset(preset)
        try:
            loaded = OmegaConf.load(path)
        except Exception as e:  # YAML syntax errors
            raise ConfigError(f"cannot read preset {path}: {e}") from e
        if not isinstance(loaded, DictConfig):
            raise ConfigError(f"preset {path} must be a mapping of config groups")
        if isinstance(loaded.get("policy"), str):
            loaded.policy = {"name": loaded.policy}
        preset_cfg = loaded

    # which policy? the command line wins over the preset
    policy_name = "full"
    if preset_cfg is not None and "policy" in preset_cfg and "name" in preset_cfg.policy:
        policy_name = str(preset_cfg.policy.name)
    rest = []
    for o in overrides:
        key, value = (s.strip() for s in o.split("=", 1))
        if key in ("policy", "policy.name"):
            policy_name = value
        else:
            rest.append(o)

    base: DictConfig = OmegaConf.structured(Config)
    base.policy = _policy_node(policy_name)
    OmegaConf.set_struct(base, True)
    OmegaConf.set_struct(base.tracking.tags, False)  # free-form: tracking.tags.suite=table2 adds a tag
    try:
        # trainer features the policy is defined with (FreezePolicy.config_defaults), under preset and CLI
        for key, value in getattr(_policy_class(policy_name), "config_defaults", {}).items():
            OmegaConf.update(base, key, value, merge=True)
        if preset_cfg is not None:
            preset_cfg = preset_cfg.copy()
            if "policy" in preset_cfg:
                preset_cfg.policy.name = policy_name
            base = OmegaConf.merge(base, preset_cfg)
        for o in rest:  # one at a time, so that an error names the override that caused it
            item = _parse_dotlist_item(o)
            try:
                base = OmegaConf.merge(base, item)
            except oc_errors.OmegaConfBaseException:
                raise
            except Exception as e:  # OmegaConf trips over some malformed keys ('[', 'a[0') itself
                raise ConfigError(f"override {o!r} cannot be applied ({type(e).__name__}: {e}); use key=value "
                                  f"with a dotted key, e.g. trainer.epochs=3") from None
        OmegaConf.to_container(base, resolve=True)  # interpolations (${...}) that do not resolve fail here
    except oc_errors.OmegaConfBaseException as e:
        raise ConfigError(_oc_message(e, base)) from None
    validate(base)
    return base


def _parse_dotlist_item(item: str) -> DictConfig:
    """``key=value`` as OmegaConf reads it (the value as YAML), with a clear error for unparsable values."""
    import yaml

    try:
        return OmegaConf.from_dotlist([item])
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"override {item!r}: the value is not valid YAML ({problem}); quote it, e.g. "
                          f"key='value'") from None
    except oc_errors.OmegaConfBaseException as e:
        raise ConfigError(f"override {item!r}: {str(e).splitlines()[0]}") from None
    except Exception as e:  # OmegaConf trips over some malformed keys ('[', 'a[0') itself
        raise ConfigError(f"override {item!r} is not a valid key=value item ({type(e).__name__}: {e}); use a "
                          f"dotted key, e.g. trainer.epochs=3") from None


#: Numeric ranges of the trainer, data and optimiser keys (one :class:`~freezebench.ranges.Range` per dotted
#: key; ``None`` passes: the key is nullable), checked by :func:`check_config_ranges` for every config. The
#: policies declare theirs the same way (``FreezePolicy.ranges``).
RANGES: dict[str, Range] = {
    "trainer.epochs": Range(0, lo_open=True),
    "data.batch_size": Range(0, lo_open=True),
    "data.eval_batch_size": Range(0, lo_open=True),
    "trainer.probe_batch_size": Range(0, lo_open=True),
    "trainer.check_finite_every": Range(0, lo_open=True),
    "trainer.max_steps_per_epoch": Range(0, lo_open=True),
    "trainer.eval_every": Range(0),
    "trainer.checkpoint_every": Range(0),  # 0: no checkpoints during training
    "optim.lr": Range(0, lo_open=True),  # nan and inf are refused: they train nothing
    "optim.weight_decay": Range(0),
    "data.val_fraction": Range(0, 1, lo_open=True, hi_open=True),
    "data.train_subset": Range(1),  # at least one sample; at most the training set (data.py)
    "data.synthetic_samples": Range(1),  # and enough for the split: check_synthetic_split
    "data.synthetic_classes": Range(2),
    "data.synthetic_size": Range(1),
    "data.synthetic_channels": Range(1),
    "sparsity.sparsity": Range(0, 1, hi_open=True),
    "sparsity.mask_every": Range(0),  # 0: a fixed mask
    "sparsity.update_fraction": Range(0, 1),
    "sparsity.update_until": Range(0, 1),
    "data.max_length": Range(2),
    "data.bucket_batches": Range(0),
    "data.text_samples": Range(4),
    "schedule.warmup_fraction": Range(0, 1, hi_open=True),
    "data.sieve.ratio": Range(0, 1, lo_open=True),
    "data.sieve.period": Range(1),
    "data.sieve.swap": Range(0, 1, lo_open=True),
}


def check_config_ranges(cfg: DictConfig) -> None:
    """Raise one :class:`ConfigError` line for the first key of :data:`RANGES` out of its range."""
    check_ranges(cfg, RANGES, get=OmegaConf.select)


def check_synthetic_split(data: Any) -> None:
    """The stratified train/validation split of ``data.name=synthetic`` needs every class on both sides."""
    if data.name != "synthetic":
        return
    n, k = int(data.synthetic_samples), int(data.synthetic_classes)

    def fits(m: int) -> bool:  # scikit-learn's train_test_split puts ceil(val_fraction * m) in validation
        m_val = math.ceil(data.val_fraction * m)
        return m_val >= k and m - m_val >= k

    if not fits(n):
        need = next(m for m in range(2 * k, 2 * k + 10**6) if fits(m))
        raise ConfigError(f"data.synthetic_samples={n} is too few for {k} classes with data.val_fraction="
                          f"{data.val_fraction}: both the training and the validation split need every class "
                          f"(at least {need} samples)")


def validate(cfg: DictConfig) -> None:
    """Checks OmegaConf cannot express: choices and ranges."""
    for key, choices in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in choices:
            raise ConfigError(f"{key}={value!r} is not one of {', '.join(choices)}.{did_you_mean(str(value), choices)}")
    check_config_ranges(cfg)
    check_synthetic_split(cfg.data)
    if cfg.data.image_size is not None and cfg.data.image_size < 1:
        raise ConfigError(f"data.image_size must be a positive number of pixels or null, got {cfg.data.image_size}")
    if cfg.data.classes is not None and (len(cfg.data.classes) < 2 or len(set(cfg.data.classes)) != len(cfg.data.classes)):
        raise ConfigError(f"data.classes must name at least two distinct classes, got {list(cfg.data.classes)}")
    if cfg.resume is not None and not str(cfg.resume).strip():
        raise ConfigError("resume must be a checkpoint path or auto")
    dev = cfg.trainer.device
    if not (dev in ("auto", "cpu", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit())):
        raise ConfigError(f"trainer.device={dev!r}: use auto, cpu, cuda or cuda:N")
    if len(cfg.optim.betas) != 2:
        raise ConfigError("optim.betas must have two values")
    cls = _policy_class(cfg.policy.name)
    check = getattr(cls, "validate_config", None)
    if check is not None:
        check(cfg.policy)


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def flatten(cfg: DictConfig) -> dict[str, Any]:
    """Dotted key -> value for every leaf (lists kept as strings), for MLflow params."""
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, DictConfig):
            for k in node.keys():
                walk(node[k], f"{prefix}{k}.")
        elif isinstance(node, ListConfig):
            out[prefix[:-1]] = str(list(node))
        else:
            out[prefix[:-1]] = node

    walk(cfg, "")
    return out


def reference_rows(cls: type) -> list[tuple[str, str, str]]:
    """(field, default, comment) for each field of a config dataclass, read from its source comments."""
    import inspect
    import re

    rows = []
    for line in inspect.getsource(cls).splitlines():
        m = re.match(r"\s+(\w+): [^=]+= (.+?)\s+#\s*(.*)$", line)
        if m:
            default = m.group(2)
            f = re.match(r"field\(default_factory=(?:lambda: )?(.+)\)$", default)
            rows.append((m.group(1), f.group(1) if f else default, m.group(3)))
    return rows


def reference_markdown() -> str:
    """The config reference as Markdown tables (the README's "Configuration reference")."""
    groups = [("model", ModelConfig), ("data", DataConfig), ("data.sieve", SieveConfig), ("optim", OptimConfig),
              ("schedule", ScheduleConfig), ("trainer", TrainerConfig), ("sparsity", SparsityConfig),
              ("tracking", TrackingConfig)]
    out = ["**top level**\n\n| key | default | meaning |\n|---|---|---|"]
    for key, default, comment in reference_rows(Config):
        if key not in {g for g, _ in groups} | {"policy"}:
            out.append(f"| `{key}` | `{default}` | {comment.replace('|', chr(92) + '|')} |")
    out.append("")
    for name, cls in groups:
        out.append(f"**`{name}.*`**\n\n| key | default | meaning |\n|---|---|---|")
        for key, default, comment in reference_rows(cls):
            text = comment.replace("|", "\\|")
            out.append(f"| `{name}.{key}` | `{default}` | {text} |")
        out.append("")
    from .registry import POLICIES

    out.append("**`policy.*`**: `policy.name` selects the policy; the other keys belong to the chosen policy:\n")
    out.append("| policy | key | default | meaning |\n|---|---|---|---|")
    for pname in POLICIES.names():
        cfg_cls = POLICIES.get(pname).Config
        for key, default, comment in reference_rows(cfg_cls):
            if key == "name":
                continue
            text = comment.replace("|", "\\|")
            out.append(f"| `{pname}` | `policy.{key}` | `{default}` | {text} |")
    out.append("")
    return "\n".join(out)
