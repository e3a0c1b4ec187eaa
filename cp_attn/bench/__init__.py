"""GPU benchmark helpers: what machine this is, its measured ceilings, timed records, test inputs.

Every record carries the GPU name, torch/triton versions, the commit and the ceiling measured in the
same run (STYLE.md 16), so docs tables can be generated from committed records.
"""
