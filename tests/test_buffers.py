"""backend/buffers.py: the tensor pool capture's recorder reuses its buffers from."""

import threading

import torch

from backend.buffers import BufferPool


def test_a_given_back_tensor_is_taken_again_for_the_same_shape_dtype_and_device():
    pool = BufferPool()
    a = pool.take((4, 8), torch.float32, "cpu")
    pool.give(a)
    assert pool.take((4, 8), torch.float16, "cpu").data_ptr() != a.data_ptr()  # another dtype: a new tensor
    assert pool.take((8, 4), torch.float32, "cpu").data_ptr() != a.data_ptr()  # another shape: a new tensor
    b = pool.take((4, 8), torch.float32, "cpu")
    assert b is a and len(pool) == 0
    assert pool.take((4, 8), torch.float32, "cpu") is not a  # taken once only


def test_views_and_tensors_beyond_the_limit_are_not_kept():
    pool = BufferPool(limit=2)
    base = torch.zeros(4, 8)
    pool.give(base[1:])  # a view: its base may still be in use
    pool.give(base.t())
    assert len(pool) == 0
    for _ in range(3):
        pool.give(torch.zeros(2))
    assert len(pool) == 2


def test_threads_giving_and_taking_never_share_a_tensor():
    pool = BufferPool(limit=64)
    held, lock = [], threading.Lock()

    def work():
        for _ in range(200):
            t = pool.take((16,), torch.float32, "cpu")
            with lock:
                assert all(t is not h for h in held)
                held.append(t)
            with lock:
                held.remove(t)
            pool.give(t)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert 1 <= len(pool) <= 4
