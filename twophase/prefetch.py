"""Batches onto the device: a loader's uint8 batches copied over and preprocessed there, on CUDA
by a background thread on a stream of its own, so the training thread only queues model steps."""

import threading
from contextlib import nullcontext
from queue import Full, Queue

import torch


def on_device(loader, preprocess, device, background=None, ahead=2):
    """(inputs, labels) batches of a loader of uint8 batches, preprocessed on the device.

    With `background` (the default on CUDA) a thread loads, copies and preprocesses batches ahead,
    keeping up to `ahead` of them ready, on CUDA in a stream of its own: the training thread then
    only queues model steps, and the pipeline's host work overlaps them (PyTorch ops release the
    GIL). On the CPU, where the model keeps every core busy, each batch is prepared when it is
    due. Batches keep the loader's order; an error in the thread is raised here.
    Iterate it inside `with contextlib.closing(...)`: the thread then stops as soon as the loop
    does, even when an error ends it."""

    def prepare(batch):
        images, labels = batch
        return preprocess(images.to(device, non_blocking=True)), labels.to(
            device, non_blocking=True
        )

    if background is None:
        background = device.type == "cuda"
    return (
        _prepared_in_background(loader, prepare, device, ahead)
        if background
        else (prepare(b) for b in loader)
    )


def _prepared_in_background(loader, prepare, device, ahead):
    batches = iter(loader)
    cuda = device.type == "cuda"
    index = (
        (device.index if device.index is not None else torch.cuda.current_device())
        if cuda
        else None
    )
    stream = _side_stream(index) if cuda else None
    queue, stop = Queue(maxsize=ahead), threading.Event()

    def produce():
        try:
            if cuda:
                torch.cuda.set_device(index)  # the current device is per thread
            with torch.cuda.stream(stream) if cuda else nullcontext():
                for batch in batches:
                    x, y = prepare(batch)
                    if not _put(queue, (x, y, stream.record_event() if cuda else None), stop):
                        return
        except BaseException as error:  # noqa: B036 (handed to the consumer, which raises it)
            _put(queue, error, stop)
            return
        _put(queue, _DONE, stop)

    thread = threading.Thread(target=produce, name="on_device", daemon=True)
    thread.start()
    try:
        while (item := queue.get()) is not _DONE:
            if isinstance(item, BaseException):
                raise item
            x, y, ready = item
            if cuda:
                current = torch.cuda.current_stream(index)
                current.wait_event(ready)  # the device waits for the batch; the host does not
                # Made on the side stream: its memory is not reused while this one uses it.
                x.record_stream(current)
                y.record_stream(current)
            yield x, y
    finally:
        stop.set()
        thread.join()


_DONE = object()
_SIDE_STREAMS = {}


def _side_stream(index):
    """One stream per device for the input pipeline, kept for the process: the caching allocator
    keeps freed memory per stream, so a new stream each epoch would strand the last one's."""
    if index not in _SIDE_STREAMS:
        _SIDE_STREAMS[index] = torch.cuda.Stream(index)
    return _SIDE_STREAMS[index]


def _put(queue, item, stop):
    """Put item unless the consumer has stopped; False if it has."""
    while not stop.is_set():
        try:
            queue.put(item, timeout=0.05)
            return True
        except Full:
            continue
    return False
