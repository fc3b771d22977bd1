"""JAX: inference compiled with `jax.jit`, without Keras' stateful variable swap.

Keras' JAX `predict` and `predict_on_batch` move the variables' values out of the
variables into a state tuple for the compiled step and write them back after it
(`_get_jax_state` / `jax_state_sync`, and `predict` even empties the variables
while it runs). Two threads doing that at once on one model break each other:
calls fail with `TypeError: 'NoneType' object is not callable` or read emptied
variables. Here the compiled function is pure: the variables' current values are
read (never written) at each call and passed in as arguments, and the function
runs under a `keras.StatelessScope` that maps each variable to its argument.
Reading a value is safe from any thread, so concurrent calls need no lock.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import keras


def compile_inference(
    function: Callable[[Any], Any], variables: Callable[[], Sequence[keras.Variable]]
) -> Callable[[Any], Any]:
    """`function` compiled with `jax.jit`, reading `variables()` live at each call.

    Args:
        function: maps a structure of arrays to a structure of tensors; may read
            Keras variables, all of which must be in `variables()`.
        variables: returns the variables `function` reads. Called at every call,
            so variables added later (e.g. by `set_catalogue`) are picked up: a
            new list of variables compiles a new function.

    Returns:
        A thread-safe callable with the same inputs and outputs as `function`.
    """
    lock = threading.Lock()
    compiled: dict[tuple[int, ...], Callable[..., Any]] = {}

    def compile_for(current: tuple[keras.Variable, ...]) -> Callable[..., Any]:
        def pure(values: list[Any], inputs: Any) -> Any:
            with keras.StatelessScope(state_mapping=list(zip(current, values, strict=True))):
                return function(inputs)

        return jax.jit(pure)

    def run(inputs: Any) -> Any:
        current = tuple(variables())
        key = tuple(id(variable) for variable in current)
        step = compiled.get(key)
        if step is None:
            with lock:
                step = compiled.get(key)
                if step is None:
                    compiled.clear()  # variables changed: the old step is stale
                    step = compiled[key] = compile_for(current)
        return step([variable.value for variable in current], inputs)

    return run


def serving_slot() -> contextlib.AbstractContextManager[None]:
    """Nothing to wait for: concurrent serving calls run at once (see the module)."""
    return contextlib.nullcontext()


@contextlib.contextmanager
def keep_state_on_error(model: keras.Model) -> Iterator[None]:
    """Puts the model's variable values back if `fit`/`evaluate`/`predict` raises.

    Keras' JAX trainer empties the variables (`_purge_model_variables`) when a
    loop starts and writes them back only when it ends, so an error raised
    inside a step (a bad batch, a shape Keras rejects) leaves every variable
    empty: the trained model is lost, and every later call fails with
    `TypeError: 'NoneType' object is not callable`. JAX arrays are immutable,
    so keeping a reference to each value costs nothing.
    """
    variables = list(model.variables)
    if getattr(model, "optimizer", None) is not None:
        variables += list(model.optimizer.variables)
    variables += list(getattr(model, "metrics_variables", []))
    kept = [(variable, variable._value) for variable in variables]  # noqa: SLF001
    try:
        yield
    except BaseException:
        for variable, value in kept:
            if value is not None:
                variable.assign(value)
        model._jax_state_synced = True  # noqa: SLF001  nothing stale to write back
        raise
