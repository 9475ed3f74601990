"""Import-light facts about parallel plans (the config validator reads them without torch)."""

TP_ARCHITECTURES = ("llama", "mistral", "qwen2")


def mesh_shape(name: str, world: int, data_parallel_size, tensor_parallel_size: int):
    """(data_parallel, tensor_parallel) sizes: fsdp shards data over the devices left after tensor
    parallelism; tp with tensor_parallel_size 1 uses every device not given to data parallelism."""
    tp = tensor_parallel_size
    if name == "tp" and tp == 1:
        tp = max(world // (data_parallel_size or 1), 1)
    dp = data_parallel_size or max(world // tp, 1)
    return dp, tp
