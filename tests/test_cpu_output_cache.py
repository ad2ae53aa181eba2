"""The cpp backend's cache of large output blocks: a block is handed out again only when nothing references it, only
for an output of its size; at most max_blocks are kept; results are the same with and without it."""
import os
import subprocess
import sys
import time

import pytest
import torch

import fbkernels

pytestmark = pytest.mark.skipif("cpp" not in fbkernels.available_backends("cpu"), reason="fbkernels._C not built")


@pytest.fixture
def cache():
    from fbkernels._cpp import LargeOutputCache

    return LargeOutputCache(min_bytes=1024, max_blocks=2, enabled=True)


@pytest.fixture
def small_blocks_cached(monkeypatch):
    """The backend's own cache, taking outputs from 1 KiB on, so that the tests' small shapes go through it."""
    from fbkernels._cpp import output_cache

    if not output_cache.enabled:
        pytest.skip("FBKERNELS_CPU_OUTPUT_CACHE=0")
    output_cache.clear()
    monkeypatch.setattr(output_cache, "min_bytes", 1024)
    yield output_cache
    output_cache.clear()


def test_a_block_is_reused_only_once_nothing_references_it(cache):
    first = cache.empty((4, 100), torch.float32)
    second = cache.empty((4, 100), torch.float32)
    assert first.data_ptr() != second.data_ptr()  # both alive: two blocks
    address = first.data_ptr()
    del first
    third = cache.empty((4, 100), torch.float32)
    assert third.data_ptr() == address and third.shape == (4, 100) and third.is_contiguous()
    # A view of an output, or its storage, keeps the block from being handed out.
    view, storage = third[1:], second.untyped_storage()
    del third, second
    fourth = cache.empty((4, 100), torch.float32)
    assert fourth.data_ptr() not in (view.data_ptr() - 400, storage.data_ptr())
    # Another size or a dtype of another size gets another block; the same byte count in another dtype may reuse.
    del view
    assert cache.empty((8, 100), torch.float32).data_ptr() != address
    assert cache.empty((4, 100), torch.int32).dtype == torch.int32


def test_small_outputs_bypass_the_cache_and_at_most_max_blocks_are_kept(cache):
    cache.empty((10,), torch.float32)  # 40 bytes < min_bytes
    assert cache.cached_bytes() == 0
    alive = [cache.empty((1024,), torch.float32) for _ in range(3)]  # the third is not cached: both blocks in use
    assert cache.cached_bytes() == 2 * 4096
    del alive
    # Full and all unused: a new size replaces the least recently used block.
    cache.empty((2048,), torch.float32)
    assert sorted(block.nbytes() for block in cache._blocks) == [4096, 8192]
    in_use = cache.empty((1024,), torch.float32)
    cache.clear()  # frees the unused 8 KiB block, keeps the one in use
    assert cache.cached_bytes() == 4096 and in_use.untyped_storage().nbytes() == 4096


def test_disabled_cache_allocates_fresh_outputs(tmp_path):
    from fbkernels._cpp import LargeOutputCache

    cache = LargeOutputCache(min_bytes=0, enabled=False)
    out = cache.empty((64,), torch.float64)
    assert out.shape == (64,) and out.dtype == torch.float64 and cache.cached_bytes() == 0
    code = "import fbkernels._cpp as c; print(c.output_cache.enabled)"
    env = {**os.environ, "FBKERNELS_CPU_OUTPUT_CACHE": "0"}
    # cwd outside the source tree: the installed package, with its compiled modules, is what gets imported.
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                            cwd=tmp_path)
    assert result.stdout.strip() == "False"


def _feedback_pass(h, f, decay, k):
    h, f, decay = (t.detach().requires_grad_() for t in (h, f, decay))
    h_next, v = fbkernels.feedback_step(h, f, decay, k, backend="cpp")
    (h_next * torch.linspace(-1, 1, h_next.numel()).view_as(h_next)).sum().add(v.square().sum()).backward()
    return h_next.detach(), v.detach(), h.grad, f.grad, decay.grad


def test_outputs_written_with_streaming_stores_are_cached_at_any_size():
    # Outputs of passes that outgrow the cache (written with non-temporal stores) come from the cache even under its
    # min_bytes; smaller passes take glibc's recently freed, cache-warm blocks.
    from fbkernels._cpp import _C, _feedback_step_params, output_cache

    if not output_cache.enabled:
        pytest.skip("FBKERNELS_CPU_OUTPUT_CACHE=0")
    output_cache.clear()
    k = 2
    small, large = torch.randn(2, 18, 16, 16), torch.randn(8, 18, 128, 128)  # 0.1 and 29 MiB of forward traffic
    assert not _C.streams(_feedback_step_params(small, k), False) and _C.streams(_feedback_step_params(large, k), False)
    assert large.nbytes < output_cache.min_bytes
    decay = torch.eye(18)
    fbkernels.feedback_step(small, small, decay, k, backend="cpp")
    assert output_cache.cached_bytes() == 0
    h_next, v = fbkernels.feedback_step(large, large, decay, k, backend="cpp")
    assert output_cache.cached_bytes() == h_next.nbytes + v.nbytes  # both written with streaming stores
    addresses = h_next.data_ptr(), v.data_ptr()
    del h_next, v
    again, v = fbkernels.feedback_step(large, large, decay, k, backend="cpp")
    assert (again.data_ptr(), v.data_ptr()) == addresses and torch.equal(again, large + large)
    output_cache.clear()


def test_results_are_the_same_with_reused_blocks_and_live_outputs_are_not_overwritten(small_blocks_cached):
    torch.manual_seed(0)
    B, d, k, S = 2, 6, 2, (9, 11)
    inputs = [(torch.randn(B, d, *S), torch.randn(B, d, *S), torch.randn(d, d) * 0.3) for _ in range(3)]
    gate_inputs = [(torch.randn(3, 8, 7, 5), torch.randn(3, 8)) for _ in range(3)]
    # Reference: the same calls with the cache off.
    small_blocks_cached.enabled = False
    expected = [_feedback_pass(*x, k) for x in inputs]
    expected_gate = [fbkernels.context_gate(h, g, 0.3, backend="cpp") for h, g in gate_inputs]
    small_blocks_cached.enabled = True
    for _ in range(2):  # the second round reuses the first round's blocks
        kept = [_feedback_pass(*x, k) for x in inputs]  # every output stays alive across the later calls
        kept_gate = [fbkernels.context_gate(h, g, 0.3, backend="cpp") for h, g in gate_inputs]
        for got, want in zip(kept, expected):
            for a, b in zip(got, want):
                assert torch.equal(a, b)
        for a, b in zip(kept_gate, expected_gate):
            assert torch.equal(a, b)
        assert small_blocks_cached.cached_bytes() > 0


def test_empty_cpu_cache_frees_unused_blocks(small_blocks_cached):
    h = torch.randn(2, 4, 16, 16)
    kept = fbkernels.feedback_step(h, h, torch.eye(4), 1, backend="cpp")  # h_next and v
    fbkernels.feedback_step(h, h, torch.eye(4), 1, backend="cpp")  # its blocks are unused once it returns
    kept_bytes = sum(t.untyped_storage().nbytes() for t in kept)
    assert small_blocks_cached.cached_bytes() == 2 * kept_bytes
    fbkernels.empty_cpu_cache()
    assert small_blocks_cached.cached_bytes() == kept_bytes


def test_gradients_accumulated_over_backwards_are_not_overwritten(small_blocks_cached):
    # A leaf's .grad may be the backward's output itself (autograd steals it): the next backward must not reuse it.
    torch.manual_seed(1)
    h, f = torch.randn(2, 6, 9, 11, requires_grad=True), torch.randn(2, 6, 9, 11, requires_grad=True)
    decay = (torch.randn(6, 6) * 0.3).requires_grad_()
    grads = []
    for enabled in (False, True):
        small_blocks_cached.enabled = enabled
        h.grad = f.grad = decay.grad = None
        for scale in (1.0, -2.0, 3.0):
            h_next, v = fbkernels.feedback_step(h, f, decay, 2, backend="cpp")
            (h_next.sum() * scale + v.square().sum()).backward()
        grads.append([t.grad.clone() for t in (h, f, decay)])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_a_block_moved_to_shared_memory_is_never_handed_out_again(small_blocks_cached):
    # Sending a tensor to another process moves its storage to shared memory in place; the receiver maps it without a
    # reference the counts see, so after the sender dropped its tensor the block looked unused and was overwritten.
    h = torch.randn(2, 4, 16, 16)
    out = fbkernels.context_gate(h, torch.zeros(2, 4), 0.5, backend="cpp")
    out.share_memory_()
    address = out.data_ptr()
    del out
    again = fbkernels.context_gate(h, torch.zeros(2, 4), 0.5, backend="cpp")
    assert again.data_ptr() != address and not again.is_shared()
    assert not any(block.is_shared() for block in small_blocks_cached._blocks)


class _OutputsMadeInAWorker(torch.utils.data.Dataset):
    def __len__(self):
        return 6

    def __getitem__(self, i):
        h = torch.full((1, 4, 16, 16), float(i))
        return fbkernels.feedback_step(h, torch.zeros_like(h), torch.eye(4), 1, backend="cpp")[0]


def test_outputs_sent_by_dataloader_workers_keep_their_values(small_blocks_cached):
    # The worker (forked: it inherits the lowered threshold) computes item i+1 while the main process holds item i.
    loader = torch.utils.data.DataLoader(_OutputsMadeInAWorker(), batch_size=None, num_workers=1, prefetch_factor=2)
    assert [float(item[0, 0, 0, 0]) for item in list(loader)] == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_child_forked_while_the_lock_is_held_can_still_allocate(small_blocks_cached):
    # Another thread inside the cache at the moment of fork left the child's copy of the lock held forever.
    with small_blocks_cached._lock:
        pid = os.fork()
        if pid == 0:  # the child: one large output, then out without running the parent's test machinery
            try:
                h = torch.randn(2, 4, 16, 16)
                fbkernels.feedback_step(h, h, torch.eye(4), 1, backend="cpp")
            finally:
                os._exit(0)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0
            return
        time.sleep(0.05)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    pytest.fail("the forked child did not finish its first large output within 60 s")
