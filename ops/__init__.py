"""Operations: the `backbone` CLI, the local stack, replay, and benchmarks."""
