"""The config's warm-up LR schedule, built so that the first optimizer step has a learning rate above 0.

DeepSpeed's WarmupLR, WarmupDecayLR and WarmupCosineLR start at iteration -1, where `get_lr` warns
"Attempting to get learning rate from scheduler before it has started" and sets the lr to the warm-up's
minimum (0 by default); the engine steps the schedule after each optimizer step, and at iteration 0 the
linear and log warm-ups are 0 too. So step 1 and step 2 ran at lr 0: two of the shipped configs' 30 steps
did nothing. Built here at iteration 1 instead, optimizer step s runs at iteration s: during a warm-up of
W steps the lr is s/W of its peak (linear) or log(s+1)/log(W) (log), the schedule reaches its decay at
step W, and the schedule's last iteration (total_num_steps) is the run's last step. The maths stays
DeepSpeed's; only the starting point moves (so the last step, at iteration total_num_steps, runs at the
schedule's end value: cos_min_ratio, or WarmupDecayLR's warmup_min_lr). A checkpoint stores the
iteration, so a resumed run continues the same sequence.
"""
from __future__ import annotations

WARMUP_SCHEDULES = ("WarmupLR", "WarmupDecayLR", "WarmupCosineLR")


def build_warmup_schedule(ds: dict, optimizer):
    """If `ds` (the config DeepSpeed will get) names one of DeepSpeed's warm-up schedules: the schedule over
    `optimizer`, set for step 1, with the "scheduler" section removed from `ds` (hand it to DeepSpeed as
    `lr_scheduler=`). Otherwise None, and DeepSpeed builds whatever the section names."""
    section = ds.get("scheduler")
    if not isinstance(section, dict) or section.get("type") not in WARMUP_SCHEDULES:
        return None
    from deepspeed.runtime import lr_schedules
    cls = getattr(lr_schedules, section["type"])
    # last_batch_iteration=0: not the default -1, whose constructor sets the lr to the minimum and warns
    schedule = cls(optimizer, **(section.get("params") or {}), last_batch_iteration=0)
    schedule.step(1)  # the lr of optimizer step 1
    del ds["scheduler"]
    return schedule
