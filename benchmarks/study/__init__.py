"""The generalization study behind `benchmarks/generalization.py` (its command line), one module a job:

    settings   the training regimes (SETTINGS), the study's constants and `Run`, the key of one run
    sam        the SAM baseline, as a step for the engine's Trainer and for MLTPTrainer
    data       the full Fashion-MNIST, converted once
    paths      one run through `engine` or `hf-trainer`, and its CSV row (`execute`)
    results    the CSV: read (older layouts upgraded), append
    matrix     the runs a setting plans, and running the missing ones in parallel processes
    report     the CSV turned into docs/generalization.md and its plot

Imported with benchmarks/ on sys.path, as the scripts there see it.
"""
