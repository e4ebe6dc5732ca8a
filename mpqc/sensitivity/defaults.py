"""Defaults of the sensitivity settings the command line shows in its help, importable without
numpy or torch."""

# Indicator training iterations (limpq, seam) when nothing else is asked for: sized in
# benchmarks/indicator_steps.py (see the README's indicator-training section).
INDICATOR_ITERATIONS = 300
