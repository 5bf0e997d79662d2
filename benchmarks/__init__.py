"""Benchmark scripts: each prints figures of one part of brainmri on this machine. Run them from
the repository root as modules, `python -m benchmarks.<name> --help` (chaos, dedup, evaluate,
export, gpu, hard_images, ingest, quality, scale, serve, sweep, train); what they share is in
benchmarks.harness. Their committed outputs are in benchmarks/results/."""
