"""The parts of tools/bench.py: budget (what each mode may hold), streams and drivers (how each mode
gets its FFN weights and computes, with the runtime's FFN math), isolation (one process per mode and
round, page-cache eviction, the cgroup cap for mmap), measure (one mode's timing loop), report
(rounds aggregated into medians with their spread, tables, JSON, plot)."""
