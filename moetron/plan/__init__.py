"""Planning: what a model costs to train and to serve on a given cluster (issue #5).

    from moetron.plan import PlanRequest, make_plan
    plan = make_plan(PlanRequest("gpt4", gpu="a100-80gb", num_gpus=25_000, tokens=13e12))

hardware.py (devices, prices, a CPU probe) · memory.py (per-GPU memory, Korthikanti et al.) ·
training.py (step time, failures) · search.py (layouts) · inference.py (KV cache, decode, cost) ·
planner.py (wires them, states assumptions) · report.py (text, plot) · published.py and
validation.py (published runs and the planner's error on them) · measure.py (closed loop on this
CPU) · cli.py (`moetron plan`).
"""

from moetron.plan.planner import Plan, PlanError, PlanRequest, load_model, make_plan

__all__ = ["Plan", "PlanError", "PlanRequest", "load_model", "make_plan"]
