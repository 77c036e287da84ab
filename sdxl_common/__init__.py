"""What the MindSpore port (`sdxl_ms`), the parity harness (`parity`) and the benchmarks share
and neither owns: exit codes and input errors, atomic writes, progress bars, input checks, the
cache folder, and the command-line conventions. It imports neither package, so the harness
reaches the port only through the stage contract."""
