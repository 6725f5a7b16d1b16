"""kiln.benchmarks: one harness for per-kernel and end-to-end measurements (JSONL rows)."""
