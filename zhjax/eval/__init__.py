"""Benchmarks the field compares by: C-Eval/CMMLU-style multiple choice (`choice`, `run`: `zhjax eval`), batched
scoring with zhjax's forward pass (`scoring`), and zhjax as an lm-evaluation-harness model (`harness`)."""
