"""Registering a method written over a stack of N models: the stacked form for the evaluation
(`STACKED_METHODS`) and its one-model case (N = 1) for `dmm unlearn` (`METHODS`)."""
from __future__ import annotations

import functools
import time
from dataclasses import replace
from typing import Callable

import torch

from attribution.engine import group_indices, pads_groups
from attribution.grouped_mlp import linear_chain
from attribution.recipes import Recipe

from ..errors import MatchingError
from ..methods import STACKED_METHODS, UnlearnTask, Unlearned, register_method
from .stack import ModelStack, StackedResult, StackedTask

StackedMethod = Callable[[StackedTask], StackedResult]
GROUP_WIDTH = 64  # models per pass where a linear chain's groups run at full width (a GPU): one model pays 64×


def register_stacked(name: str, config: type, needs: tuple[str, ...] = ()) -> Callable[[StackedMethod], StackedMethod]:
    def add(method: StackedMethod) -> StackedMethod:
        STACKED_METHODS[name] = method = in_full_groups(method)

        def one_model(task: UnlearnTask) -> Unlearned:
            start = time.perf_counter()
            result = method(stacked_task(task))
            return Unlearned(result.stack.module(0, like=task.model),
                             {**result.stats, "seconds": time.perf_counter() - start})

        one_model.__doc__ = method.__doc__
        register_method(name, config, needs)(one_model)
        return method
    return add


def in_full_groups(method: StackedMethod) -> StackedMethod:
    """`method` run on groups of `GROUP_WIDTH` models, the last filled with copies of its last model (and
    seed), where a linear chain's groups run at full width (`attribution.engine.group_indices`: on a GPU), so
    that each model's result does not depend on how many are unlearned with it; elsewhere `method` itself."""
    @functools.wraps(method)
    def run(task: StackedTask) -> StackedResult:
        stack = task.stack
        if not pads_groups(stack.device) or linear_chain(stack.base) is None:
            return method(task)
        results = [method(replace(task, stack=ModelStack(stack.base, {k: v[g] for k, v in stack.params.items()},
                                                         {k: v[g] for k, v in stack.buffers.items()}),
                                   seeds=tuple(task.seeds[i] for i in g)))
                   for g in group_indices(stack.size, GROUP_WIDTH, full=True)]
        params, buffers = ({k: torch.cat([getattr(r.stack, part)[k] for r in results])[:stack.size]
                            for k in getattr(stack, part)} for part in ("params", "buffers"))
        return StackedResult(ModelStack(stack.base, params, buffers), results[0].stats)
    return run


def stacked_task(task: UnlearnTask) -> StackedTask:
    """The one-model task as a stack of N = 1; model name and recipe default to the store's."""
    if task.oracles:
        raise MatchingError("--oracles is for --method om; drop it")
    model_name, recipe = training_of(task)
    return StackedTask(ModelStack.of([task.model]), task.data, task.forget_ids, task.config, (task.config.seed,),
                       model_name, recipe)


def training_of(task: UnlearnTask) -> tuple[str | None, Recipe | None]:
    """(model name, recipe) task.model was built and trained with: the task's, else the store's."""
    spec = task.store.spec if task.store is not None else None
    return (task.model_name or (spec.model if spec else None),
            task.recipe or (Recipe.from_dict(spec.recipe) if spec else None))
