"""Metric names, defined once: what the trainer logs (per epoch and at the end of a run), and what the
report, the sweeps and the CLI read.

Per epoch (MLflow step = epoch number, ``RunResult.history``): the trainer's own metrics below, then every
hook's (:mod:`freezebench.trainer.hooks`): ``policy/<name>`` from the policy's ``epoch_metrics()``,
:data:`SPARSITY_DENSITY`, the cache's ``cache/*``, :data:`GRAD_NORM`. At the end (``RunResult.metrics``):
the last epoch's plus :data:`TIME_TOTAL_S`, :data:`TIME_POLICY_TOTAL_S`, :data:`COST_SAVING_FRAC`,
:data:`FREEZE_EVENTS`. Importing this module needs nothing but Python.
"""

from __future__ import annotations

# --- per epoch -------------------------------------------------------------------------------------------
TRAIN_LOSS = "train/loss"  # mean training loss of the epoch's samples
TRAIN_ACC = "train/acc"
VAL_LOSS = "val/loss"  # the latest evaluation (every trainer.eval_every epochs and the last)
VAL_ACC = "val/acc"
TIME_EPOCH_S = "time/epoch_s"  # training loop + evaluation
TIME_TRAIN_S = "time/train_s"  # training loop minus policy time
TIME_EVAL_S = "time/eval_s"
TIME_POLICY_S = "time/policy_s"  # the policy's observe / decide / apply in the epoch
COST_TFLOPS = "cost/tflops"  # cumulative, cost model (freezebench.cost)
COST_TFLOPS_EPOCH = "cost/tflops_epoch"
COST_TFLOPS_FULL = "cost/tflops_full"  # what dense, unfrozen training of the same samples would spend
FROZEN_UNITS = "freeze/frozen_units"
FROZEN_PARAM_FRAC = "freeze/frozen_param_frac"
PEAK_MB = "mem/peak_mb"
LR = "lr"  # the global learning rate at the epoch's last step
SAMPLES_PER_EPOCH = "data/samples_per_epoch"  # over all ranks
SPARSITY_DENSITY = "sparsity/density"  # sparsity.* on
GRAD_NORM = "train/grad_norm"  # trainer.grad_norm_metric on
POLICY_PREFIX = "policy/"  # + the names of a policy's epoch_metrics()
CACHE_MB = "cache/mb"  # trainer.cache_frozen_prefix on
CACHE_SERVED = "cache/served_samples"
CACHE_COMPUTED = "cache/computed_samples"

# --- at the end of a run ---------------------------------------------------------------------------------
TIME_TOTAL_S = "time/total_s"
TIME_POLICY_TOTAL_S = "time/policy_total_s"
COST_SAVING_FRAC = "cost/saving_frac"  # 1 - cost/tflops / cost/tflops_full
FREEZE_EVENTS = "freeze/events"

#: prefixes of wall-clock and memory figures (they differ between identical runs)
TIMING_PREFIXES = ("time/", "mem/")
