"""Defaults of the sensitivity settings the command line shows in its help, importable without
numpy or torch."""

# Indicator training iterations (limpq, seam) when nothing else is asked for: sized in
# benchmarks/indicator_steps.py (see the README's indicator-training section).
INDICATOR_ITERATIONS = 300
# SEAM's terms (mpqc.sensitivity.margin): the margin m in nats, the weight of the compactness term
# and the weight of the margin softmax. (m, 0, 0) turns both off: seam then trains limpq's loss.
SEAM_TERMS = (1.0, 1.0, 1.0)
