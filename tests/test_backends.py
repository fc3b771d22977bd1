"""`two_tower.backends`: the module of the session's backend, tested in that session."""

import threading
import time

import keras
import numpy as np

from two_tower.backends import backend_module


def test_compiled_inference_reads_variables_live():
    layer = keras.layers.Dense(2, use_bias=False)
    layer.build((None, 3))
    run = backend_module().compile_inference(lambda x: layer(x), lambda: layer.variables)
    inputs = np.eye(3, dtype="float32")
    kernel = np.arange(6, dtype="float32").reshape(3, 2)
    layer.kernel.assign(kernel)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(run(inputs)), kernel)
    layer.kernel.assign(-kernel)  # a compiled step must not keep the traced value
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(run(inputs)), -kernel)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(layer.kernel), -kernel)


def test_serving_slot_bounds_concurrent_calls_and_is_reentrant():
    module = backend_module()
    threads, lock, running, peak = 6, threading.Lock(), [0], [0]
    start = threading.Barrier(threads)

    def call():
        start.wait()
        with module.serving_slot(), module.serving_slot():  # recommend -> search re-enters
            with lock:
                running[0] += 1
                peak[0] = max(peak[0], running[0])
            time.sleep(0.2)
            with lock:
                running[0] -= 1

    workers = [threading.Thread(target=call) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=30)
    assert not any(worker.is_alive() for worker in workers), "serving_slot deadlocked"
    if keras.backend.backend() == "torch":
        # Eager torch calls interleaved by many threads run slower than a few at once.
        assert peak[0] == module.SERVING_SLOTS
    else:
        assert peak[0] == threads  # nothing is serialised
