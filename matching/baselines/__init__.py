"""The field's baseline unlearners (DESIGN.md §5), registered in `matching.methods` on import.

Each is written once over a stack of N models (`stack.ModelStack`, one model is N = 1); the SGD-based
ones share one training loop (`loop.descend`), SSD and IU share the per-sample gradients (`per_sample`);
`pru` is the exception (linear models, one at a time). The module of a method names the paper it follows.
"""
from . import (amnesiac, ascent, boundary, finetune, influence, last_blocks, localised, pru,  # noqa: F401
               random_label, retrain, salun, scrub, sisa, ssd)  # registration
