"""Infrastructure every layer uses: the device mesh, checkpoints, the optimizer, performance accounting, the
metrics writer, the compilation cache, preemption, the workdir lock, atomic writes and the named errors."""
