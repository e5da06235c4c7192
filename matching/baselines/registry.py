"""Registering a method written over a stack of N models: the stacked form for the evaluation
(`STACKED_METHODS`) and its one-model case (N = 1) for `dmm unlearn` (`METHODS`)."""
from __future__ import annotations

import time
from typing import Callable

from attribution.recipes import Recipe

from ..errors import MatchingError
from ..methods import STACKED_METHODS, UnlearnTask, Unlearned, register_method
from .stack import ModelStack, StackedResult, StackedTask

StackedMethod = Callable[[StackedTask], StackedResult]


def register_stacked(name: str, config: type, needs: tuple[str, ...] = ()) -> Callable[[StackedMethod], StackedMethod]:
    def add(method: StackedMethod) -> StackedMethod:
        STACKED_METHODS[name] = method

        def one_model(task: UnlearnTask) -> Unlearned:
            start = time.perf_counter()
            result = method(stacked_task(task))
            return Unlearned(result.stack.module(0, like=task.model),
                             {**result.stats, "seconds": time.perf_counter() - start})

        one_model.__doc__ = method.__doc__
        register_method(name, config, needs)(one_model)
        return method
    return add


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
