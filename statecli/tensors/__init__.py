"""Tensor bytes: a tensor record turned into bytes or a torch tensor, straight from the file.

``source`` reads a storage's bytes (whole, or in chunks while the caller works); ``views`` turns them
into the tensor a record describes; ``values`` walks a report's tensors for stats, diff and check;
``dcp`` rebuilds torch.distributed.checkpoint tensors from their chunks. torch is imported when called.
"""
