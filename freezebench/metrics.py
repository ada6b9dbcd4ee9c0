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
# text tasks (freezebench.zoo.text_data.task_metrics), as GLUE defines them (Wang et al., ICLR 2019)
VAL_F1 = "val/f1"  # F1 of the positive class: MRPC, QQP
VAL_MCC = "val/mcc"  # Matthews correlation: CoLA
VAL_SCORE = "val/score"  # the task's main metric (CoLA: mcc; MRPC, QQP: f1; the others and text_demo: acc)
TIME_EPOCH_S = "time/epoch_s"  # training loop + evaluation
TIME_TRAIN_S = "time/train_s"  # training loop minus policy time (and compile time, trainer.compile)
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
# trainer.compile on (freezebench.features.compile); counts are cumulative
COMPILE_COMPILES = "compile/compiles"  # frozen sets whose training forward was compiled
COMPILE_RECOMPILES = "compile/recompiles"  # compiles caused by freezing (at most the frozen-set changes)
COMPILE_SHAPE_RECOMPILES = "compile/shape_recompiles"  # compiles for a new input shape within a frozen set
COMPILE_FALLBACKS = "compile/fallbacks"  # times dynamo ran part of the training forward eagerly
COMPILE_GRAPH_BREAKS = "compile/graph_breaks"
COMPILE_REGIONS = "compile/regions"  # compile regions built (one per frozen set and compiled module)
TIME_COMPILE_S = "time/compile_s"  # compile seconds in the epoch (not part of time/train_s)
TIME_COMPILE_TOTAL_S = "time/compile_total_s"

# --- at the end of a run ---------------------------------------------------------------------------------
TIME_TOTAL_S = "time/total_s"
TIME_POLICY_TOTAL_S = "time/policy_total_s"
COST_SAVING_FRAC = "cost/saving_frac"  # 1 - cost/tflops / cost/tflops_full
FREEZE_EVENTS = "freeze/events"

#: prefixes of wall-clock and memory figures (they differ between identical runs)
TIMING_PREFIXES = ("time/", "mem/")
